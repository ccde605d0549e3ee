/* parse.h: Ethernet, IPv4, IPv6, UDP, the QUIC short header and the walk past coalesced
 * long headers to it, with explicit bounds. The fast path and the crypto shim both parse
 * with these.
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
#include "quic.h"

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
	union {
		struct {
			__u8 saddr[16];	/* IPv4: first 4 bytes */
			__u8 daddr[16];
		};
		__u8 addrs[32];		/* both, loaded at once from an IPv6 header */
	};
	__u16 sport;			/* NBO */
	__u16 dport;			/* NBO */
};

/* fr_parse_udp_flags flags. */
#define FR_PARSE_IPV4_OPTIONS 0x1	/* accept IPv4 options (ihl 6..15) and skip them. The fast
					 * path does not: it passes such packets up untouched. The
					 * crypto shim does: it must protect every 1-RTT packet of
					 * an offloaded connection, options or not. */

/* Parse Ethernet/IPv4|IPv6/UDP and the QUIC first byte. 0 or an ingress reason
 * (callers on egress map them to their own). @flags: FR_PARSE_*, a constant at every
 * call so the unused branches fold away. */
static __always_inline int fr_parse_udp_flags(struct __sk_buff *skb, struct fr_pkt *p, __u32 flags)
{
	/* Few and small stack copies: the crypto shim inlines this next to its AEAD, whose
	 * stack is near the 512-byte limit. IPv6 addresses load straight into *p.
	 * The EtherType is skb->protocol, which the stack (eth_type_trans on receive, the
	 * output path on transmit) and BPF_PROG_TEST_RUN set from the frame's: no load. */
	__u16 proto = skb->protocol;
	union {
		struct iphdr ip;	/* the IPv4 header */
		__u8 ip6[8];		/* IPv6's first 8 bytes: version .. hop limit */
	} hdr;
	struct udphdr udp;
	__u32 len = skb->len;

	p->len = len;
	if (len < FR_ETH_HLEN)
		return FR_IN_PASS_MALFORMED;
	p->l3_off = FR_ETH_HLEN;

	if (proto == BE_ETH_P_IP) {
		struct iphdr *ip = &hdr.ip;
		if (len < FR_ETH_HLEN + FR_IPV4_HLEN)
			return FR_IN_PASS_MALFORMED;
		if (bpf_skb_load_bytes(skb, FR_ETH_HLEN, ip, FR_IPV4_HLEN))
			return FR_IN_PASS_MALFORMED;
		if (ip->version != 4)
			return FR_IN_PASS_MALFORMED;
		if (ip->protocol != FR_IPPROTO_UDP)
			return FR_IN_PASS_NOT_UDP;
		if (ip->ihl < 5)
			return FR_IN_PASS_MALFORMED;
		if (ip->ihl != 5 && !(flags & FR_PARSE_IPV4_OPTIONS))
			return FR_IN_PASS_IP_OPTIONS;
		if (ip->frag_off & bpf_htons(0x3fff))	/* MF or fragment offset */
			return FR_IN_PASS_FRAGMENT;
		if (bpf_ntohs(ip->tot_len) > len - FR_ETH_HLEN)
			return FR_IN_PASS_MALFORMED;
		p->family = 4;
		__builtin_memcpy(p->saddr, &ip->saddr, 4);
		__builtin_memcpy(p->daddr, &ip->daddr, 4);
		/* without the flag ihl is 5 here: the constant keeps the fast path's offsets known */
		p->l4_off = FR_ETH_HLEN + ((flags & FR_PARSE_IPV4_OPTIONS) ? ip->ihl * 4 : FR_IPV4_HLEN);
	} else if (proto == BE_ETH_P_IPV6) {
		const __u8 *ip6 = hdr.ip6;	/* version 4 bits, class, flow; payload length; next */
		if (len < FR_ETH_HLEN + FR_IPV6_HLEN)
			return FR_IN_PASS_MALFORMED;
		if (bpf_skb_load_bytes(skb, FR_ETH_HLEN, hdr.ip6, sizeof(hdr.ip6)))
			return FR_IN_PASS_MALFORMED;
		if ((ip6[0] >> 4) != 6)
			return FR_IN_PASS_MALFORMED;
		__u8 nexthdr = ip6[6];
		if (nexthdr != FR_IPPROTO_UDP) {
			/* Extension headers (hop-by-hop 0, routing 43, fragment 44, dest opts 60)
			 * are not walked; anything else is another transport. */
			if (nexthdr == 0 || nexthdr == 43 || nexthdr == 44 || nexthdr == 60)
				return FR_IN_PASS_IP_OPTIONS;
			return FR_IN_PASS_NOT_UDP;
		}
		if ((((__u32)ip6[4] << 8) | ip6[5]) > len - FR_ETH_HLEN - FR_IPV6_HLEN)
			return FR_IN_PASS_MALFORMED;
		/* saddr and daddr are adjacent, as in the IPv6 header */
		if (bpf_skb_load_bytes(skb, FR_ETH_HLEN + offsetof(struct ipv6hdr, saddr), p->addrs, 32))
			return FR_IN_PASS_MALFORMED;
		p->family = 6;
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

/* The fast path's parse: IPv4 options go up untouched (FR_IN_PASS_IP_OPTIONS). */
static __always_inline int fr_parse_udp(struct __sk_buff *skb, struct fr_pkt *p)
{
	return fr_parse_udp_flags(skb, p, 0);
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

/* Long-header packets fr_find_short walks past before the short-header one. */
#ifndef FR_MAX_COALESCED
#define FR_MAX_COALESCED 3
#endif

/* Where the datagram's short-header (1-RTT) packet starts: first in the UDP payload, or
 * after coalesced long-header packets (RFC 9000 §12.2) whose Length fields are followed
 * (QUIC v1 and v2 types, RFC 9369 §3.2). 0 with *short_off set; FR_IN_PASS_LONG_HEADER
 * when the walk finds none (fixed bit clear: padding or not QUIC; a Retry or Version
 * Negotiation packet, which nothing follows; an unknown version; more than
 * FR_MAX_COALESCED long headers); FR_IN_PASS_MALFORMED when a long header runs past the
 * datagram. Connection-id lengths are not checked (a long header's Length still says
 * where the next packet starts). */
static __always_inline int fr_find_short(struct __sk_buff *skb, const struct fr_pkt *p,
					 __u32 *short_off)
{
	__u32 off = p->quic_off, end = p->quic_end;
	__u8 first = p->first;		/* fr_parse_udp loaded it: quic_off < quic_end */

#pragma clang loop unroll(disable)
	for (int i = 0; i <= FR_MAX_COALESCED; i++) {
		__u8 h[6];
		__u8 scid_len;
		__u32 version, type, is_initial, n = 0;
		__u64 v = 0;

		if (!(first & QUIC_FIXED_BIT))
			return FR_IN_PASS_LONG_HEADER;
		if (!(first & QUIC_HDR_FORM_LONG)) {
			*short_off = off;
			return 0;
		}
		if (end - off < sizeof(h) || bpf_skb_load_bytes(skb, off, h, sizeof(h)))
			return FR_IN_PASS_MALFORMED;
		version = ((__u32)h[1] << 24) | ((__u32)h[2] << 16) | ((__u32)h[3] << 8) | h[4];
		type = (h[0] >> 4) & 0x03;
		if (version == QUIC_VERSION_1) {
			if (type == QUIC_V1_TYPE_RETRY)
				return FR_IN_PASS_LONG_HEADER;
			is_initial = type == QUIC_V1_TYPE_INITIAL;
		} else if (version == QUIC_VERSION_2) {
			if (type == QUIC_V2_TYPE_RETRY)
				return FR_IN_PASS_LONG_HEADER;
			is_initial = type == QUIC_V2_TYPE_INITIAL;
		} else {
			return FR_IN_PASS_LONG_HEADER;	/* version negotiation or unknown */
		}
		off += sizeof(h) + h[5];		/* DCID */
		if (off >= end || bpf_skb_load_bytes(skb, off, &scid_len, 1))
			return FR_IN_PASS_MALFORMED;
		off += 1 + scid_len;			/* SCID */
		if (is_initial) {
			if (quic_varint_load(skb, off, end, &v, &n) || v > end - off - n)
				return FR_IN_PASS_MALFORMED;
			off += n + v;			/* token */
		}
		if (quic_varint_load(skb, off, end, &v, &n) || v > end - off - n)
			return FR_IN_PASS_MALFORMED;
		off += n + v;				/* Length: packet number and payload */
		if (off >= end)
			return FR_IN_PASS_LONG_HEADER;
		if (bpf_skb_load_bytes(skb, off, &first, 1))
			return FR_IN_PASS_MALFORMED;
	}
	return FR_IN_PASS_LONG_HEADER;
}

#endif /* FASTRELAY_PARSE_H */
