/* parse.h: Ethernet, IPv4, IPv6, UDP and the QUIC short header, with explicit bounds.
 *
 * Headers are copied with bpf_skb_load_bytes (works on non-linear skbs, leaves no packet
 * pointer to invalidate); every length is checked against skb->len before the load.
 * Helpers return 0 when parsed, or a reason (reasons.h) saying why not.
 */
#ifndef FASTRELAY_PARSE_H
#define FASTRELAY_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

#include "consts.h"
#include "reasons.h"

/* Where the headers of one UDP packet are. Offsets from the start of the frame. */
struct fr_pkt {
	__u32 len;			/* skb->len at parse time */
	__u32 l3_off;			/* IP header */
	__u32 l4_off;			/* UDP header */
	__u32 quic_off;			/* UDP payload (QUIC header) */
	__u32 quic_end;			/* end of the UDP payload (UDP length, not skb->len) */
	__u32 csum_off;			/* UDP checksum field */
	__u8 family;			/* 4 or 6 */
	__u8 first;			/* QUIC first byte */
	__u8 _pad[2];
	__u8 saddr[16];			/* IPv4: first 4 bytes */
	__u8 daddr[16];
	__u16 sport;			/* NBO */
	__u16 dport;			/* NBO */
};

/* Parse Ethernet/IPv4|IPv6/UDP and the QUIC first byte. 0 or an ingress reason
 * (callers on egress map them to their own). */
static __always_inline int fr_parse_udp(struct __sk_buff *skb, struct fr_pkt *p)
{
	struct ethhdr eth;
	struct udphdr udp;
	__u32 len = skb->len;

	p->len = len;
	if (len < FR_ETH_HLEN)
		return FR_IN_PASS_MALFORMED;
	if (bpf_skb_load_bytes(skb, 0, &eth, FR_ETH_HLEN))
		return FR_IN_PASS_MALFORMED;
	p->l3_off = FR_ETH_HLEN;

	if (eth.h_proto == BE_ETH_P_IP) {
		struct iphdr ip;
		if (len < FR_ETH_HLEN + FR_IPV4_HLEN)
			return FR_IN_PASS_MALFORMED;
		if (bpf_skb_load_bytes(skb, FR_ETH_HLEN, &ip, FR_IPV4_HLEN))
			return FR_IN_PASS_MALFORMED;
		if (ip.version != 4)
			return FR_IN_PASS_MALFORMED;
		if (ip.protocol != FR_IPPROTO_UDP)
			return FR_IN_PASS_NOT_UDP;
		if (ip.ihl != 5)
			return FR_IN_PASS_IP_OPTIONS;
		if (ip.frag_off & bpf_htons(0x3fff))	/* MF or fragment offset */
			return FR_IN_PASS_FRAGMENT;
		if (bpf_ntohs(ip.tot_len) > len - FR_ETH_HLEN)
			return FR_IN_PASS_MALFORMED;
		p->family = 4;
		__builtin_memcpy(p->saddr, &ip.saddr, 4);
		__builtin_memcpy(p->daddr, &ip.daddr, 4);
		p->l4_off = FR_ETH_HLEN + FR_IPV4_HLEN;
	} else if (eth.h_proto == BE_ETH_P_IPV6) {
		struct ipv6hdr ip6;
		if (len < FR_ETH_HLEN + FR_IPV6_HLEN)
			return FR_IN_PASS_MALFORMED;
		if (bpf_skb_load_bytes(skb, FR_ETH_HLEN, &ip6, FR_IPV6_HLEN))
			return FR_IN_PASS_MALFORMED;
		if (ip6.version != 6)
			return FR_IN_PASS_MALFORMED;
		if (ip6.nexthdr != FR_IPPROTO_UDP) {
			/* Extension headers (hop-by-hop 0, routing 43, fragment 44, dest opts 60)
			 * are not walked; anything else is another transport. */
			if (ip6.nexthdr == 0 || ip6.nexthdr == 43 || ip6.nexthdr == 44 || ip6.nexthdr == 60)
				return FR_IN_PASS_IP_OPTIONS;
			return FR_IN_PASS_NOT_UDP;
		}
		if (bpf_ntohs(ip6.payload_len) > len - FR_ETH_HLEN - FR_IPV6_HLEN)
			return FR_IN_PASS_MALFORMED;
		p->family = 6;
		__builtin_memcpy(p->saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->daddr, &ip6.daddr, 16);
		p->l4_off = FR_ETH_HLEN + FR_IPV6_HLEN;
	} else {
		return FR_IN_PASS_NOT_UDP;
	}

	if (len < p->l4_off + FR_UDP_HLEN)
		return FR_IN_PASS_MALFORMED;
	if (bpf_skb_load_bytes(skb, p->l4_off, &udp, FR_UDP_HLEN))
		return FR_IN_PASS_MALFORMED;
	__u32 udp_len = bpf_ntohs(udp.len);
	if (udp_len < FR_UDP_HLEN + 1 || udp_len > len - p->l4_off)
		return FR_IN_PASS_MALFORMED;
	p->sport = udp.source;
	p->dport = udp.dest;
	p->csum_off = p->l4_off + 6;
	p->quic_off = p->l4_off + FR_UDP_HLEN;
	p->quic_end = p->l4_off + udp_len;
	if (bpf_skb_load_bytes(skb, p->quic_off, &p->first, 1))
		return FR_IN_PASS_MALFORMED;
	return 0;
}

/* Where the parts of a QUIC short header (RFC 9000 §17.3.1) are, given the DCID length
 * (not on the wire: the receiver's choice) and the tag slot after the payload. */
struct fr_short {
	__u32 dcid_off;
	__u32 pn_off;
	__u32 payload_off;		/* first frame */
	__u32 payload_end;		/* end of the frames (tag slot excluded) */
	__u8 dcid_len;
	__u8 pn_len;			/* 1..4 */
	__u8 _pad[2];
};

static __always_inline int fr_is_long_header(const struct fr_pkt *p)
{
	return p->first & QUIC_HDR_FORM_LONG;
}

/* 0, or FR_IN_PASS_MALFORMED when the fixed bit is clear or a part is missing
 * (at least one byte of frames is required). */
static __always_inline int fr_parse_short(const struct fr_pkt *p, __u32 dcid_len, __u32 tag_len,
					  struct fr_short *s)
{
	if (!(p->first & QUIC_FIXED_BIT))
		return FR_IN_PASS_MALFORMED;
	if (dcid_len > QUIC_MAX_CID_LEN || tag_len > 32)
		return FR_IN_PASS_MALFORMED;
	s->dcid_len = dcid_len;
	s->pn_len = (p->first & QUIC_PN_LEN_MASK) + 1;
	s->dcid_off = p->quic_off + 1;
	s->pn_off = s->dcid_off + dcid_len;
	s->payload_off = s->pn_off + s->pn_len;
	if (p->quic_end < s->payload_off + tag_len + 1)
		return FR_IN_PASS_MALFORMED;
	s->payload_end = p->quic_end - tag_len;
	return 0;
}

#endif /* FASTRELAY_PARSE_H */
