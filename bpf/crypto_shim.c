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
 * egress, never sent in plaintext. Every verdict is counted in shim_stats. One exception
 * to the drop: a datagram that does not decrypt but ends in the peer's stateless reset
 * token (RFC 9000 §10.3, installed by userspace) goes up unchanged and unmarked, for the
 * relay to end the connection.
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

#include "shim_structs.h"
#include "structs.h"		/* the skb verdict contract with the fast path */
#include "parse.h"		/* the fast path's parser, shared */
#include "quic_protect.h"

/* Per connection and direction: state, keys, packet-number state. */
BPF_HASH(shim_conns, struct shim_conn_key, struct shim_conn, SHIM_MAX_CONNS);
/* The verification token; written once by userspace. */
BPF_ARRAY(shim_config, struct shim_config, 1);
/* Counters per CPU. */
BPF_PERCPU_ARRAY(shim_stats, struct shim_stats, 1);
/* The packet's headers (parse.h), its connection key and its short-header packet. */
struct shim_pkt {
	struct shim_conn_key key;
	struct qp_packet qp;
	struct fr_pkt fr;
};

/* Per-CPU working memory of the packet being processed (the stack is too small). */
struct shim_scratch {
	struct cp_scratch cp;
	struct shim_pkt pkt;
};
BPF_PERCPU_ARRAY(shim_scratch, struct shim_scratch, 1);

/* @addr (parse.h's layout: IPv4 in the first 4 bytes) as the key's 16 bytes: IPv4-mapped
 * (::ffff:a.b.c.d) for IPv4. */
static __always_inline void shim_key_addr(__u8 *out, const __u8 *addr, __u8 family)
{
	if (family == 4) {
		__builtin_memset(out, 0, 10);
		out[10] = 0xff;
		out[11] = 0xff;
		__builtin_memcpy(out + 12, addr, 4);
	} else {
		__builtin_memcpy(out, addr, 16);
	}
}

/* Fill the key with the datagram's addresses and ports, @egress: source is local. */
static __always_inline void shim_set_key(struct shim_conn_key *k, const struct fr_pkt *fr,
					 int egress)
{
	shim_key_addr(k->local_addr, egress ? fr->saddr : fr->daddr, fr->family);
	shim_key_addr(k->peer_addr, egress ? fr->daddr : fr->saddr, fr->family);
	k->local_port = egress ? fr->sport : fr->dport;
	k->peer_port = egress ? fr->dport : fr->sport;
	k->direction = egress ? SHIM_DIR_SEND : SHIM_DIR_RECV;
}

/* Common start of both programs: the connection entry of a short-header packet, or NULL
 * (the packet then passes, unless egress finds the fast path's mark on it).
 *
 * Parsed with the fast path's parse.h, with one difference on purpose: IPv4 options are
 * accepted (FR_PARSE_IPV4_OPTIONS). The fast path passes such packets up, but here a
 * packet the shim cannot parse leaves unchanged, so an offloaded connection's 1-RTT
 * packet with options would leave in plaintext: it is protected (and verified on
 * ingress) like any other. Not parsed, so left unchanged: fragments and IPv6 extension
 * headers, as before (no fragment can be protected alone: the AEAD covers the whole
 * datagram; the relay's QUIC datagrams stay below the path MTU, so the stack does not
 * fragment them), and, new with parse.h, IP lengths that overrun the frame (the IP stack
 * never emits such a frame and drops it on receipt; a fast-path clone carrying one is
 * dropped by its mark). */
static __always_inline struct shim_conn *shim_lookup(struct __sk_buff *skb, struct shim_pkt *p,
						     int egress)
{
	__u32 off = 0;

	if (fr_parse_udp_flags(skb, &p->fr, FR_PARSE_IPV4_OPTIONS))
		return 0;
	if (fr_find_short(skb, &p->fr, &off))
		return 0;
	p->qp.off = off;
	p->qp.len = p->fr.quic_end - off;
	p->qp.odd = (off - p->fr.l4_off) & 1;
	p->qp.csum_off = p->fr.csum_off;
	shim_set_key(&p->key, &p->fr, egress);
	return shim_conns.lookup(&p->key);
}

/* RFC 9000 §10.3.1: a datagram that did not decrypt and whose last 16 bytes are the
 * peer's stateless reset token (a whole datagram of at least 21 bytes, short-header form,
 * nothing coalesced before it). Compared as an OR of XORs, no branch on the bytes; an
 * all-zero token means "none" and never matches. The skb is untouched (qp_unprotect leaves
 * it unchanged on every error). */
static __always_inline int shim_is_stateless_reset(struct __sk_buff *skb, const struct shim_pkt *p,
						   const struct shim_conn *conn)
{
	const __u64 *want = (const __u64 *)conn->reset_token;
	__u64 tail[2];

	if (p->qp.off != p->fr.quic_off || p->qp.len < 21)
		return 0;
	if (bpf_skb_load_bytes(skb, p->fr.quic_end - 16, tail, sizeof(tail)))
		return 0;
	return (want[0] | want[1]) != 0 && ((tail[0] ^ want[0]) | (tail[1] ^ want[1])) == 0;
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
	if ((ret == QP_BAD_TAG || ret == QP_TOO_SHORT || ret == QP_NO_PHASE) &&
	    shim_is_stateless_reset(skb, p, conn)) {
		/* Userspace ends the connection; never marked verified, so the fast path does
		 * not forward it (the verdict was cleared above). */
		st->ingress_stateless_reset++;
		return TC_ACT_UNSPEC;
	}
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
