/* crypto_shim.c: the `soft` crypto backend's kernel shim, QUIC 1-RTT protection in TC.
 *
 * shim_ingress sits on the relay's interfaces before the fast path: it removes header
 * protection from a known connection's short-header packet, verifies and decrypts it
 * and writes the per-boot verification token into its tag slot (RFC 9001 §5.3, §5.4).
 * shim_egress sits after the fast path and applies protection to the plaintext layout
 * userspace and the fast path emit. crypto_backends/soft_shim.py loads both and writes
 * the maps.
 *
 * Fail closed: a packet whose tag does not verify is dropped (TC_ACT_SHOT), never handed
 * up as decrypted; a 1-RTT packet of an offloaded connection without keys is dropped on
 * egress, never sent in plaintext. Every verdict is counted in shim_stats.
 *
 * With the fast path (bpf/structs.h, "skb verdict contract"): ingress clears the verdict
 * in skb->cb of every packet and, after a tag verified on a connection the fast path holds
 * (SHIM_CONN_FASTPATH), writes FR_CB_VERIFIED with its connection index: the fast path
 * forwards nothing else of an offloaded connection. Egress protects what the fast path
 * marked FR_CB_PROTECT with the exact packet number it wrote; such a packet without keys
 * here is dropped.
 *
 * Verdicts: TC_ACT_SHOT for a drop, TC_ACT_UNSPEC otherwise so the next filter on the
 * hook (the fast path at ingress) still runs.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#include "shim_structs.h"
#include "structs.h"		/* the skb verdict contract with the fast path */
#include "quic_protect.h"

/* Long-header packets coalesced before the short-header one that the shim walks past. */
#ifndef SHIM_MAX_COALESCED
#define SHIM_MAX_COALESCED 3
#endif

#define SHIM_QUIC_V1 0x00000001
#define SHIM_QUIC_V2 0x6b3343cf

/* Per connection and direction: state, keys, packet-number state. */
BPF_HASH(shim_conns, struct shim_conn_key, struct shim_conn, SHIM_MAX_CONNS);
/* The verification token; written once by userspace. */
BPF_ARRAY(shim_config, struct shim_config, 1);
/* Counters per CPU. */
BPF_PERCPU_ARRAY(shim_stats, struct shim_stats, 1);
/* Where the packet's UDP datagram and QUIC short-header packet are. */
struct shim_pkt {
	struct shim_conn_key key;
	struct qp_packet qp;
	__u64 udp_off;
	__u64 udp_end;
	__u8 ip[40];		/* the IP header as loaded */
	__u8 addrs[32];		/* source and destination, IPv4-mapped */
};

/* Per-CPU working memory of the packet being processed (the stack is too small). */
struct shim_scratch {
	struct cp_scratch cp;
	struct shim_pkt pkt;
};
BPF_PERCPU_ARRAY(shim_scratch, struct shim_scratch, 1);

/* Fill the key with the datagram's addresses and ports, @egress: source is local. */
static __always_inline void shim_set_addrs(struct shim_conn_key *k, const __u8 *src,
					   const __u8 *dst, __u16 sport, __u16 dport, int egress)
{
	const __u8 *local = egress ? src : dst, *peer = egress ? dst : src;

	__builtin_memcpy(k->local_addr, local, 16);
	__builtin_memcpy(k->peer_addr, peer, 16);
	k->local_port = egress ? sport : dport;
	k->peer_port = egress ? dport : sport;
	k->direction = egress ? SHIM_DIR_SEND : SHIM_DIR_RECV;
}

/* Ethernet / IPv4 or IPv6 / UDP. Returns 0 with the key and UDP bounds set, -1 when the
 * frame is not an unfragmented UDP datagram. */
static __always_inline int shim_parse_udp(struct __sk_buff *skb, struct shim_pkt *p, int egress)
{
	__u8 *addrs = p->addrs, *ip = p->ip;
	__u16 ports[2];
	__u16 udp_len;
	__u64 l4;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u64 ihl;

		__builtin_memset(addrs, 0, 32);
		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, 20))
			return -1;
		if ((ip[0] >> 4) != 4 || ip[9] != IPPROTO_UDP)
			return -1;
		if ((ip[6] & 0x3f) || ip[7])	/* MF or fragment offset: not ours */
			return -1;
		ihl = (ip[0] & 0x0f) * 4;
		if (ihl < 20)
			return -1;
		l4 = ETH_HLEN + ihl;
		addrs[10] = 0xff;
		addrs[11] = 0xff;
		__builtin_memcpy(addrs + 12, ip + 12, 4);
		addrs[26] = 0xff;
		addrs[27] = 0xff;
		__builtin_memcpy(addrs + 28, ip + 16, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, 40))
			return -1;
		if ((ip[0] >> 4) != 6 || ip[6] != IPPROTO_UDP)
			return -1;
		l4 = ETH_HLEN + 40;
		__builtin_memcpy(addrs, ip + 8, 32);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
		return -1;
	if (bpf_skb_load_bytes(skb, l4 + 4, &udp_len, sizeof(udp_len)))
		return -1;
	p->udp_off = l4;
	p->udp_end = l4 + bpf_ntohs(udp_len);
	if (p->udp_end < l4 + 8 || p->udp_end > skb->len)
		return -1;
	shim_set_addrs(&p->key, addrs, addrs + 16, ports[0], ports[1], egress);
	return 0;
}

/* A QUIC varint at @off; returns its value, sets *len to its size, -1 on failure. */
static __always_inline long shim_varint(struct __sk_buff *skb, __u64 off, __u64 *len)
{
	__u8 b[8] = {};
	__u64 n, v = 0;
	int i;

	if (bpf_skb_load_bytes(skb, off, b, 1))
		return -1;
	n = 1ULL << (b[0] >> 6);
	QP_PIN(n);
	if (n > 8)
		return -1;
	if (n > 1 && bpf_skb_load_bytes(skb, off, b, n))
		return -1;
	b[0] &= 0x3f;
#pragma clang loop unroll(full)
	for (i = 0; i < 8; i++)
		if (i < n)
			v = (v << 8) | b[i];
	*len = n;
	return v;
}

/* Find the short-header packet: first in the datagram or after coalesced long-header
 * packets (RFC 9000 §12.2). Returns 0 with p->qp set, -1 when there is none. */
static __always_inline int shim_find_short(struct __sk_buff *skb, struct shim_pkt *p)
{
	__u64 off = p->udp_off + 8, n;
	int i;

#pragma clang loop unroll(disable)
	for (i = 0; i <= SHIM_MAX_COALESCED; i++) {
		__u8 h[6];
		__u8 cid_len;
		__u32 version;
		__u64 type, is_initial;
		long v;

		if (off >= p->udp_end)
			return -1;
		if (bpf_skb_load_bytes(skb, off, h, 1))
			return -1;
		if (!(h[0] & 0x40))
			return -1;	/* padding or not QUIC */
		if (!(h[0] & 0x80)) {
			p->qp.off = off;
			p->qp.len = p->udp_end - off;
			p->qp.odd = (off - p->udp_off) & 1;
			p->qp.csum_off = p->udp_off + 6;
			return 0;
		}
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)))
			return -1;
		version = ((__u32)h[1] << 24) | ((__u32)h[2] << 16) | ((__u32)h[3] << 8) | h[4];
		type = (h[0] >> 4) & 0x03;
		if (version == SHIM_QUIC_V1) {
			if (type == 3)
				return -1;	/* Retry: no Length, nothing follows */
			is_initial = type == 0;
		} else if (version == SHIM_QUIC_V2) {
			if (type == 0)
				return -1;
			is_initial = type == 1;
		} else {
			return -1;	/* version negotiation or unknown */
		}
		off += 6 + h[5];	/* DCID */
		if (bpf_skb_load_bytes(skb, off, &cid_len, 1))
			return -1;
		off += 1 + cid_len;	/* SCID */
		if (is_initial) {
			v = shim_varint(skb, off, &n);
			if (v < 0)
				return -1;
			off += n + v;	/* token */
		}
		v = shim_varint(skb, off, &n);
		if (v < 0)
			return -1;
		off += n + v;
		if (off > 0xffff)
			return -1;
	}
	return -1;
}

/* Common start of both programs: the connection entry of a short-header packet, or NULL. */
static __always_inline struct shim_conn *shim_lookup(struct __sk_buff *skb, struct shim_pkt *p,
						     int egress)
{
	if (shim_parse_udp(skb, p, egress))
		return 0;
	if (shim_find_short(skb, p))
		return 0;
	return shim_conns.lookup(&p->key);
}

int shim_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct shim_stats *st = shim_stats.lookup(&zero);
	struct shim_scratch *s = shim_scratch.lookup(&zero);
	struct shim_config *cfg = shim_config.lookup(&zero);
	struct shim_pkt *p;
	struct shim_conn *conn;
	int ret;

	if (!st || !s || !cfg)
		return TC_ACT_UNSPEC;
	p = &s->pkt;
	st->ingress_packets++;
	st->ingress_bytes += skb->len;
	skb->cb[FR_CB_VERDICT] = 0;	/* only this program's own verdict reaches the fast path */

	conn = shim_lookup(skb, p, 0);
	if (!conn || conn->state == SHIM_STATE_PASS) {
		st->ingress_passed++;
		return TC_ACT_UNSPEC;
	}
	if (conn->state != SHIM_STATE_KEYS) {
		st->ingress_no_keys++;	/* userspace decrypts it with its own AEAD */
		return TC_ACT_UNSPEC;
	}
	if (skb->gso_segs > 1) {
		st->ingress_gso++;	/* one header for many packets: userspace decrypts them */
		return TC_ACT_UNSPEC;
	}
	ret = qp_unprotect(skb, &p->qp, conn, &s->cp, cfg->token);
	switch (ret) {
	case QP_OK:
		st->ingress_decrypted++;
		st->ingress_key_phase_1 += p->qp.key_phase;
		st->ingress_previous_phase += p->qp.previous;
		if (conn->flags & SHIM_CONN_FASTPATH) {
			skb->cb[FR_CB_VERDICT] = FR_CB_MAGIC | FR_CB_VERIFIED;
			skb->cb[FR_CB_CONN] = conn->fr_conn_idx;
		}
		return TC_ACT_UNSPEC;
	case QP_TOO_LONG:
		st->ingress_too_long++;	/* handed up encrypted: userspace verifies it */
		return TC_ACT_UNSPEC;
	case QP_TOO_SHORT:
		st->ingress_drop_too_short++;
		return TC_ACT_SHOT;
	case QP_BAD_TAG:
		st->ingress_drop_bad_tag++;
		return TC_ACT_SHOT;
	case QP_NO_PHASE:
		st->ingress_drop_no_phase++;
		return TC_ACT_SHOT;
	default:
		st->ingress_drop_error++;
		return TC_ACT_SHOT;
	}
}

int shim_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct shim_stats *st = shim_stats.lookup(&zero);
	struct shim_scratch *s = shim_scratch.lookup(&zero);
	struct shim_pkt *p;
	struct shim_conn *conn;
	__u32 verdict = skb->cb[FR_CB_VERDICT];
	int ret, marked, have_pn;
	__u64 pn;

	if (!st || !s)
		return TC_ACT_SHOT;
	p = &s->pkt;
	st->egress_packets++;
	st->egress_bytes += skb->len;
	/* The fast path marked it: a clone or a packet it renumbered, in plaintext. */
	marked = (verdict & FR_CB_MAGIC_MASK) == FR_CB_MAGIC && (verdict & FR_CB_PROTECT);
	have_pn = marked && (verdict & FR_CB_HAVE_PN);
	pn = ((__u64)skb->cb[FR_CB_PN_HI] << 32) | skb->cb[FR_CB_PN_LO];

	conn = shim_lookup(skb, p, 1);
	if (!conn || conn->state == SHIM_STATE_PASS) {
		if (marked) {
			st->egress_drop_no_keys++;	/* never a marked packet in plaintext */
			return TC_ACT_SHOT;
		}
		st->egress_passed++;
		return TC_ACT_UNSPEC;
	}
	if (conn->state != SHIM_STATE_KEYS) {
		st->egress_drop_no_keys++;
		return TC_ACT_SHOT;
	}
	if (marked && (!(conn->flags & SHIM_CONN_FASTPATH) ||
		       skb->cb[FR_CB_CONN] != conn->fr_conn_idx)) {
		st->egress_drop_wrong_conn++;
		return TC_ACT_SHOT;
	}
	if (skb->gso_segs > 1) {
		st->egress_drop_gso++;	/* the segments would be protected as one packet */
		return TC_ACT_SHOT;
	}
	ret = qp_protect(skb, &p->qp, conn, &s->cp, pn, have_pn);
	switch (ret) {
	case QP_OK:
		st->egress_encrypted++;
		st->egress_key_phase_1 += p->qp.key_phase;
		return TC_ACT_UNSPEC;
	case QP_TOO_SHORT:
		st->egress_drop_too_short++;
		return TC_ACT_SHOT;
	case QP_TOO_LONG:
		st->egress_drop_too_long++;
		return TC_ACT_SHOT;
	case QP_NO_PHASE:
		st->egress_drop_no_phase++;
		return TC_ACT_SHOT;
	default:
		st->egress_drop_error++;
		return TC_ACT_SHOT;
	}
}
