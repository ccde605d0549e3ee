/* fastpath_ingress.c: TC ingress on every relay interface: fan-out of upstream packets.
 *
 * A QUIC short-header packet whose DCID is an upstream (publisher-side) connection and
 * which carries a STREAM frame of a forwarded stream (or a DATAGRAM of a forwarded
 * track) is cloned once per subscriber of that connection with bpf_clone_redirect to the
 * subscriber's device; the egress program there (fastpath_egress.c) rewrites each clone.
 * The original always goes up unchanged (the upstream connection needs every packet).
 * Everything else goes up untouched and counted: long headers, unknown CIDs, GSO, IP
 * options, malformed input.
 *
 * A stream becomes forwarded when its first frame (offset 0) starts a MoQT
 * SUBGROUP_HEADER for a forwarded track: the program records its alias and publisher
 * priority in fr_up_streams.
 *
 * Stages (tail calls through fr_progs, so the verifier sees one frame at a time):
 *   fastpath_ingress        headers, DCID lookup, crypto verdict, walker set-up
 *   fastpath_ingress_walk   one frame per call (FR_PROG_IN_WALK), at most MAX_FRAMES
 *   fastpath_ingress_clone  the fan-out loop (FR_PROG_IN_CLONE)
 * State between stages: fr_scratch[FR_SCRATCH_INGRESS] (per CPU).
 *
 * Verdict: TC_ACT_UNSPEC always (the original continues; later filters still run).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "consts.h"
#include "structs.h"
#include "reasons.h"
#include "maps.h"
#include "parse.h"
#include "quic.h"
#include "csum.h"

/* Read the MoQT SUBGROUP_HEADER at the start of a stream: track alias, group and
 * publisher priority. 0, or -1 if it is not one or is cut. */
static __always_inline int fr_subgroup_header(struct __sk_buff *skb, __u32 off, __u32 end,
					      __u64 *alias, __u64 *group, __u8 *priority)
{
	__u64 type = 0, v = 0;
	__u32 n = 0;
	if (quic_varint_load(skb, off, end, &type, &n))
		return -1;
	off += n;
	if (type < 0x10 || type > 0x1d || (type & 0x6) == 0x6)
		return -1;
	if (quic_varint_load(skb, off, end, alias, &n))	/* track alias */
		return -1;
	off += n;
	if (quic_varint_load(skb, off, end, group, &n))	/* group id */
		return -1;
	off += n;
	if ((type & 0x6) == 0x4) {			/* subgroup id field present */
		if (quic_varint_load(skb, off, end, &v, &n))
			return -1;
		off += n;
	}
	if (off >= end || bpf_skb_load_bytes(skb, off, priority, 1))
		return -1;
	return 0;
}

/* Is this STREAM frame's stream forwarded? Learns streams at offset 0. */
static __always_inline int fr_stream_forwarded(struct __sk_buff *skb, __u32 up_idx,
					       const struct quic_frame *f)
{
	struct fr_up_stream_key k = {.up_idx = up_idx, .sid = f->sid};
	struct fr_up_stream *us = fr_up_streams.lookup(&k);
	if (us)
		return us->flags & FR_UPS_FORWARD;
	if (f->offset != 0)
		return 0;

	struct fr_up_stream nus = {};
	if (fr_subgroup_header(skb, f->data_off, f->data_off + f->data_len, &nus.alias, &nus.group,
			       &nus.priority))
		return 0;
	struct fr_track_key tk = {.up_idx = up_idx, .alias = nus.alias};
	struct fr_track *t = fr_tracks.lookup(&tk);
	if (!t || !(t->flags & FR_TRACK_FORWARD))
		return 0;
	nus.flags = FR_UPS_FORWARD;
	fr_up_streams.update(&k, &nus);
	return 1;
}

/* Is this DATAGRAM (an OBJECT_DATAGRAM) of a forwarded track? */
static __always_inline int fr_datagram_forwarded(struct __sk_buff *skb, __u32 up_idx,
						 const struct quic_frame *f)
{
	__u64 type = 0, alias = 0;
	__u32 n = 0, end = f->data_off + f->data_len;
	if (quic_varint_load(skb, f->data_off, end, &type, &n))
		return 0;
	if (quic_varint_load(skb, f->data_off + n, end, &alias, &n))
		return 0;
	struct fr_track_key tk = {.up_idx = up_idx, .alias = alias};
	struct fr_track *t = fr_tracks.lookup(&tk);
	return t && (t->flags & FR_TRACK_FORWARD);
}

static __always_inline int fr_in_pass(__u32 reason, __u32 bytes)
{
	fr_count(reason, bytes);
	return TC_ACT_UNSPEC;
}

int fastpath_ingress(struct __sk_buff *skb)
{
	__u32 bytes = skb->len;
	fr_count(FR_IN_SEEN, bytes);

	if (skb->gso_segs > 1)
		return fr_in_pass(FR_IN_PASS_GSO, bytes);

	struct fr_pkt p = {};
	int r = fr_parse_udp(skb, &p);
	if (r)
		return fr_in_pass(r, bytes);
	if (fr_is_long_header(&p))
		return fr_in_pass(FR_IN_PASS_LONG_HEADER, bytes);

	__u32 zero = 0;
	struct fr_config *cfg = fr_config.lookup(&zero);
	if (!cfg || cfg->host_cid_len > QUIC_MAX_CID_LEN)
		return fr_in_pass(FR_IN_PASS_UNKNOWN_CID, bytes);
	__u32 cid_len = cfg->host_cid_len;

	struct fr_cid_key ck = {};
	ck.len = cid_len;
	if (cid_len > p.quic_end - p.quic_off - 1)
		return fr_in_pass(FR_IN_PASS_MALFORMED, bytes);
	if (cid_len && bpf_skb_load_bytes(skb, p.quic_off + 1, ck.cid, cid_len & 0x1f))
		return fr_in_pass(FR_IN_PASS_MALFORMED, bytes);
	__u32 *conn_idx = fr_cids.lookup(&ck);
	if (!conn_idx)
		return fr_in_pass(FR_IN_PASS_UNKNOWN_CID, bytes);
	__u32 ci = *conn_idx;
	struct fr_conn *conn = fr_conns.lookup(&ci);
	if (!conn)
		return fr_in_pass(FR_IN_PASS_UNKNOWN_CID, bytes);
	if (conn->role != FR_ROLE_UPSTREAM)
		return fr_in_pass(FR_IN_PASS_NOT_UPSTREAM, bytes);
	if (conn->protection == FR_PROT_USERSPACE)
		return fr_in_pass(FR_IN_PASS_PROTECTED, bytes);
	if (conn->protection != FR_PROT_CLEAR &&
	    (skb->cb[FR_CB_VERDICT] != (FR_CB_MAGIC | FR_CB_VERIFIED) || skb->cb[FR_CB_CONN] != ci))
		return fr_in_pass(FR_IN_PASS_NOT_VERIFIED, bytes);

	struct fr_short s = {};
	r = fr_parse_short(&p, cid_len, conn->tag_len, &s);
	if (r)
		return fr_in_pass(r, bytes);

	__u32 slot = FR_SCRATCH_INGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return fr_in_pass(FR_IN_PASS_NO_PROG, bytes);
	w->off = s.payload_off;
	w->end = s.payload_end;
	w->forwarded = 0;
	w->steps = 0;
	w->up_idx = conn->role_idx;
	w->conn_idx = ci;
	w->bytes = bytes;
	fr_progs.call(skb, FR_PROG_IN_WALK);
	return fr_in_pass(FR_IN_PASS_NO_PROG, bytes);
}

/* Stage FR_PROG_IN_WALK: one frame; then itself again, or the clone stage. */
int fastpath_ingress_walk(struct __sk_buff *skb)
{
	__u32 slot = FR_SCRATCH_INGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return TC_ACT_UNSPEC;
	__u32 bytes = w->bytes;
	__u32 off = w->off, end = w->end;

	if (off >= end) {
		if (!w->forwarded)
			return fr_in_pass(FR_IN_PASS_NOT_FORWARDED, bytes);
		fr_progs.call(skb, FR_PROG_IN_CLONE);
		return fr_in_pass(FR_IN_PASS_NO_PROG, bytes);
	}
	if (w->steps >= MAX_FRAMES)
		return fr_in_pass(FR_IN_PASS_FRAME_LIMIT, bytes);
	w->steps += 1;

	struct quic_frame f = {};
	int r = quic_frame_parse(skb, off, end, &f);
	if (r == QUIC_WALK_BAD)
		return fr_in_pass(FR_IN_PASS_BAD_FRAME, bytes);
	if (r != QUIC_WALK_OK)
		return fr_in_pass(FR_IN_PASS_FRAME_LIMIT, bytes);
	if (f.type >= QUIC_FRAME_STREAM && f.type <= QUIC_FRAME_STREAM_MAX) {
		if (fr_stream_forwarded(skb, w->up_idx, &f))
			w->forwarded = 1;
	} else if (f.type == QUIC_FRAME_DATAGRAM || f.type == QUIC_FRAME_DATAGRAM_LEN) {
		if (fr_datagram_forwarded(skb, w->up_idx, &f))
			w->forwarded = 1;
	}
	w->off = f.end;
	fr_progs.call(skb, FR_PROG_IN_WALK);
	return fr_in_pass(FR_IN_PASS_NO_PROG, bytes);
}

/* Stage FR_PROG_IN_CLONE: one clone per eligible subscriber, the original goes up. */
int fastpath_ingress_clone(struct __sk_buff *skb)
{
	__u32 slot = FR_SCRATCH_INGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return TC_ACT_UNSPEC;
	/* Copy out before cloning: the egress program runs nested inside
	 * bpf_clone_redirect on this CPU (it uses its own scratch slot). */
	__u32 bytes = w->bytes;
	__u32 up_idx = w->up_idx;

	struct fr_upstream *up = fr_upstreams.lookup(&up_idx);
	if (!up)
		return fr_in_pass(FR_IN_PASS_NOT_FORWARDED, bytes);
	__u32 n = up->n_subs;
	if (n > MAX_SUBSCRIBERS_PER_UPSTREAM) {
		/* One count per packet whose list is longer than the kernel serves. */
		fr_count(FR_IN_FANOUT_LIMIT, bytes);
		n = MAX_SUBSCRIBERS_PER_UPSTREAM;
	}

	/* Clone loop (toolchain.md §7): constant bound, no unrolling, count from the map,
	 * only converging side effects on the clone result. bpf_clone_redirect
	 * invalidates packet pointers; nothing here holds one. */
	__u32 old_mark = skb->mark;
	fr_count(FR_IN_CLONED, bytes);
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < MAX_SUBSCRIBERS_PER_UPSTREAM; i++) {
		if (i >= n)
			break;
		__u32 sub_idx = up->subs[i];
		struct fr_sub *sub = fr_subs.lookup(&sub_idx);
		if (!sub || !(sub->flags & FR_SUB_ACTIVE) || !sub->ifindex) {
			fr_count(FR_IN_SUB_SKIPPED, bytes);
			continue;
		}
		skb->mark = FR_MARK_MAGIC | FR_MARK_CLONE | (sub_idx & FR_MARK_SUB_MASK);
		long err = bpf_clone_redirect(skb, sub->ifindex, 0);
		fr_count(err ? FR_IN_CLONE_ERR : FR_IN_CLONE, bytes);
	}
	skb->mark = old_mark;
	return TC_ACT_UNSPEC;
}
