/* fastpath_egress.c: TC egress toward subscribers: per-subscriber rewrite of clones,
 * renumbering of userspace's 1-RTT packets, registration records.
 *
 * Clones (mark FR_MARK_MAGIC | FR_MARK_CLONE | subscriber index, made by
 * fastpath_ingress.c) are rewritten for the subscriber: MACs, IP addresses, UDP ports
 * (checksums fixed), the DCID, the key phase bit, stream ids of forwarded streams (into
 * the subscriber's stream-id space), the track alias of a stream handed to the
 * subscriber (its subgroup header at offset 0) and of OBJECT_DATAGRAMs, where the
 * subscriber's fr_sub_tracks.sub_alias differs (in place at the upstream's width, else
 * punted FR_PUNT_ALIAS_WIDTH), and every frame that belongs to the upstream connection,
 * to a stream this subscriber does not get, or to a range already handed out is
 * overwritten with PADDING. Then the packet number comes from the subscriber's atomic
 * counter (RFC 9000 §17.1 / A.2), credit and congestion window are checked, and a
 * record goes to fr_events. A punted clone is dropped with a punt record listing its
 * stream ranges: userspace sends them.
 *
 * Fields whose size changes for the subscriber (its DCID length differs from the
 * upstream's, its packet number needs more bytes than the publisher wrote, a stream id
 * needs a wider varint) resize the packet in place, once, at the end: the walk rewrites
 * same-size fields in place at the offsets as they are and only plans the others
 * (fr_scratch.grow[]: grow[0] the QUIC header, then stream ids), so no offset it
 * recorded moves before it is used. Each edit changes the size by an even number of
 * bytes (a PADDING byte goes in front of a frame, or after the packet number, when the
 * field grew by an odd number), so every byte behind keeps its checksum parity and the
 * UDP checksum changes only by the edited bytes and the lengths. The send stage decides
 * (limit, PN) and re-enters itself by tail call (resize_phase) to resize from a fresh
 * verifier state: the bytes from the UDP header to the last edit are copied to
 * fr_scratch.head; bpf_skb_adjust_room(BPF_ADJ_ROOM_NET) makes or takes the room behind
 * the IP header (the head moves) or, for CHECKSUM_PARTIAL clones (detected through
 * bpf_l4_csum_replace, csum.h) and with fr_config FR_CFG_RESIZE_AT_TAIL,
 * bpf_skb_change_tail at the end and the bytes behind the last edit move (the UDP header
 * stays where csum_start points); the head is written back with the edits; IPv4 total
 * length and header checksum, IPv6 payload length, UDP length and checksum (the
 * pseudo-header's length only for CHECKSUM_PARTIAL) are fixed. A grown packet must fit
 * fr_sub.max_udp_payload (UDP payload bytes; 0 = unknown: punted), else it is punted
 * with the reason of the first field that changed (FR_PUNT_CID_LEN, FR_PUNT_PN_GROW,
 * FR_PUNT_SID_GROW); a shrunk one always fits. A stream id that must grow more than
 * FR_GROW_MAX_HEAD bytes into the datagram is punted (FR_PUNT_SID_GROW). The record's
 * size and pn_len are those sent.
 *
 * Userspace's 1-RTT packets to a subscriber (found by peer address) get their packet
 * number from the same counter, in place (same length), and a record carrying the PN
 * bytes userspace wrote. Long headers, upstream connections and unknown peers pass
 * untouched. Connections offloaded without keys: 1-RTT dropped (never plaintext).
 *
 * Stages (tail calls through fr_progs; state in fr_scratch[FR_SCRATCH_EGRESS]):
 *   fastpath_egress        demux, userspace renumbering, clone set-up
 *   fastpath_egress_walk   one frame of a clone per call (FR_PROG_EG_WALK)
 *   fastpath_egress_send   credit, PN, header rewrite or resize, record (FR_PROG_EG_SEND)
 *
 * Verdicts: TC_ACT_UNSPEC for what leaves (the crypto shim after us still runs; never
 * TC_ACT_OK, which would end the filter chain before it), TC_ACT_SHOT for withheld
 * clones and dropped packets.
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

static __always_inline int fr_eg_verdict(__u32 reason, __u32 bytes, int verdict)
{
	fr_count(reason, bytes);
	return verdict;
}

/* Hand the crypto shim its verdict for a packet of connection conn_idx; with have_pn,
 * the full packet number written into it (the shim's nonce needs it, structs.h). */
static __always_inline void fr_set_cb(struct __sk_buff *skb, const struct fr_conn *conn,
				      __u32 conn_idx, __u32 quic_off, __u32 dcid_len,
				      __u32 pn_len, __u32 clone, __u64 pn, __u32 have_pn)
{
	if (conn->protection != FR_PROT_OFFLOAD_KEYS)
		return;
	skb->cb[FR_CB_VERDICT] = FR_CB_MAGIC | FR_CB_PROTECT | (clone ? FR_CB_CLONE : 0) |
				 (have_pn ? FR_CB_HAVE_PN : 0);
	skb->cb[FR_CB_CONN] = conn_idx;
	skb->cb[FR_CB_LAYOUT] = (quic_off & 0xffff) | (dcid_len << 16) | (pn_len << 24);
	skb->cb[FR_CB_PN_LO] = (__u32)pn;
	skb->cb[FR_CB_PN_HI] = (__u32)(pn >> 32);
}

/* Submit flags: wake the reader for one record in RING_WAKEUP_EVERY (per CPU). */
static __always_inline __u64 fr_ring_flags(void)
{
	__u32 slot = FR_SCRATCH_EGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return 0;
	w->ring_count += 1;
	return (w->ring_count & (RING_WAKEUP_EVERY - 1)) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}

/* Emit a record without frames (userspace packets, clones with nothing walked). */
static __always_inline void fr_emit_simple(__u8 kind, __u8 reason, __u32 sub_idx, __u32 conn_idx,
					   __u64 wire_pn, __u32 pn_len, __u32 size, __u32 built_pn)
{
	struct fr_record *rec = fr_events.ringbuf_reserve(sizeof(struct fr_record));
	if (!rec) {
		fr_count(FR_EG_RING_FULL, size);
		return;
	}
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->kind = kind;
	rec->reason = reason;
	rec->pn_len = pn_len;
	rec->sub_idx = sub_idx;
	rec->conn_idx = conn_idx;
	rec->wire_pn = wire_pn;
	rec->ts_ns = bpf_ktime_get_ns();
	rec->size = size;
	rec->built_pn = built_pn;
	fr_events.ringbuf_submit(rec, fr_ring_flags());
}

/* Emit the record built in the scratch (clones). */
static __always_inline void fr_emit_scratch(struct fr_scratch *w)
{
	struct fr_record *rec = fr_events.ringbuf_reserve(sizeof(struct fr_record));
	if (!rec) {
		fr_count(FR_EG_RING_FULL, w->bytes);
		return;
	}
	__builtin_memcpy(rec, &w->rec, sizeof(*rec));
	rec->ts_ns = bpf_ktime_get_ns();
	fr_events.ringbuf_submit(rec, fr_ring_flags());
}

/* A clone is withheld: mark its frames punted, emit the record, drop it. Its new stream
 * bytes were handed out (next_offset moved): userspace sends them, and they use the
 * subscriber's MAX_DATA credit all the same. */
static __always_inline int fr_punt_clone(struct fr_scratch *w, __u32 reason)
{
	w->rec.kind = FR_REC_PUNT_CLONE;
	w->rec.reason = reason;
	if (w->new_bytes) {
		__u32 sub_idx = w->sub_idx;
		struct fr_sub *sub = fr_subs.lookup(&sub_idx);
		if (sub)
			__sync_fetch_and_add(&sub->data_used, w->new_bytes);
	}
#pragma clang loop unroll(disable)
	for (int k = 0; k < MAX_RECORD_FRAMES; k++) {
		if (k >= w->rec.n_frames)
			break;
		w->rec.frames[k].action = FR_FA_PUNTED;
	}
	fr_emit_scratch(w);
	fr_count(reason, w->bytes);
	return TC_ACT_SHOT;
}

/* --- userspace packets ------------------------------------------------------------------ */

static __always_inline int fr_egress_user(struct __sk_buff *skb, __u32 bytes)
{
	struct fr_pkt p = {};
	if (fr_parse_udp(skb, &p))
		return fr_eg_verdict(FR_EG_PASS_NOT_OURS, bytes, TC_ACT_UNSPEC);

	struct fr_addr_key ak = {};
	__builtin_memcpy(ak.addr, p.daddr, 16);
	ak.port = p.dport;
	ak.family = p.family;
	__u32 *cip = fr_peers.lookup(&ak);
	if (!cip)
		return fr_eg_verdict(FR_EG_PASS_NOT_OURS, bytes, TC_ACT_UNSPEC);
	__u32 ci = *cip;
	struct fr_conn *conn = fr_conns.lookup(&ci);
	if (!conn || conn->role == FR_ROLE_NONE)
		return fr_eg_verdict(FR_EG_PASS_NOT_OURS, bytes, TC_ACT_UNSPEC);
	if (fr_is_long_header(&p))
		return fr_eg_verdict(FR_EG_PASS_LONG_HEADER, bytes, TC_ACT_UNSPEC);
	if (conn->protection == FR_PROT_USERSPACE)
		return fr_eg_verdict(FR_EG_PASS_PROTECTED, bytes, TC_ACT_UNSPEC);
	if (conn->protection == FR_PROT_OFFLOAD_NOKEYS)
		return fr_eg_verdict(FR_EG_DROP_NO_KEYS, bytes, TC_ACT_SHOT);
	if (conn->role != FR_ROLE_SUBSCRIBER) {
		/* An upstream connection: our packets to it keep aioquic's numbers. */
		struct fr_short us = {};
		if (!fr_parse_short(&p, conn->peer_cid_len, conn->tag_len, &us))
			fr_set_cb(skb, conn, ci, p.quic_off, us.dcid_len, us.pn_len, 0, 0, 0);
		return fr_eg_verdict(FR_EG_PASS_UPSTREAM, bytes, TC_ACT_UNSPEC);
	}

	__u32 sub_idx = conn->role_idx;
	struct fr_sub *sub = fr_subs.lookup(&sub_idx);
	if (!sub)
		return fr_eg_verdict(FR_EG_PASS_MALFORMED, bytes, TC_ACT_UNSPEC);
	struct fr_short s = {};
	if (fr_parse_short(&p, sub->dcid_len, conn->tag_len, &s))
		return fr_eg_verdict(FR_EG_PASS_MALFORMED, bytes, TC_ACT_UNSPEC);
	__u32 size = p.quic_end - p.quic_off;
	if (skb->gso_segs > 1) {
		fr_emit_simple(FR_REC_PUNT_USER, FR_PUNT_GSO, sub_idx, ci, 0, s.pn_len, size, 0);
		return fr_eg_verdict(FR_PUNT_GSO, bytes, TC_ACT_SHOT);
	}

	__u64 be = 0;
	if (fr_load_be64(skb, s.pn_off, p.len, &be))
		return fr_eg_verdict(FR_EG_PASS_MALFORMED, bytes, TC_ACT_UNSPEC);
	__u32 pn_len = s.pn_len;
	__u32 built = be >> (64 - 8 * pn_len);

	__u64 full = __sync_fetch_and_add(&sub->next_pn, 1);
	if (quic_pn_len_needed(full, sub->largest_acked) > pn_len) {
		fr_emit_simple(FR_REC_PUNT_USER, FR_PUNT_USER_PN_GROW, sub_idx, ci, full, pn_len, size,
			       built);
		return fr_eg_verdict(FR_PUNT_USER_PN_GROW, bytes, TC_ACT_SHOT);
	}
	__u8 buf[FR_CSUM_MAX_WRITE] = {};
	quic_pn_store(full, pn_len, buf);
	if (fr_csum_write(skb, p.csum_off, s.pn_off, buf, pn_len & 7))
		return fr_eg_verdict(FR_EG_PASS_MALFORMED, bytes, TC_ACT_UNSPEC);
	fr_emit_simple(FR_REC_SENT_USER, 0, sub_idx, ci, full, pn_len, size, built);
	fr_set_cb(skb, conn, ci, p.quic_off, s.dcid_len, pn_len, 0, full, 1);
	return fr_eg_verdict(FR_EG_RENUMBERED, bytes, TC_ACT_UNSPEC);
}

/* --- clones --------------------------------------------------------------------------- */

static __always_inline int fr_egress_clone(struct __sk_buff *skb, __u32 sub_idx, __u32 bytes)
{
	skb->mark = 0;			/* the clone's identity ends here */
	__u32 slot = FR_SCRATCH_EGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return fr_eg_verdict(FR_EG_DROP_NO_PROG, bytes, TC_ACT_SHOT);
	__builtin_memset(&w->rec, 0, sizeof(w->rec));
	w->bytes = bytes;
	w->sub_idx = sub_idx;
	w->punt = 0;
	w->steps = 0;
	w->new_bytes = 0;
	w->n_sent = 0;
	w->n_grow = 0;
	w->sid_delta = 0;
	w->resize_phase = 0;
	w->cid_len = 0;
	w->rec.kind = FR_REC_SENT_CLONE;
	w->rec.sub_idx = sub_idx;

	struct fr_sub *sub = fr_subs.lookup(&sub_idx);
	if (!sub || !(sub->flags & FR_SUB_ACTIVE)) {
		fr_emit_scratch(w);
		w->rec.kind = FR_REC_PUNT_CLONE;
		return fr_eg_verdict(FR_PUNT_NO_SUBSCRIBER, bytes, TC_ACT_SHOT);
	}
	__u32 ci = sub->conn_idx;
	w->conn_idx = ci;
	w->rec.conn_idx = ci;
	struct fr_conn *conn = fr_conns.lookup(&ci);
	if (!conn)
		return fr_punt_clone(w, FR_PUNT_NO_SUBSCRIBER);

	struct fr_pkt p = {};
	if (fr_parse_udp(skb, &p) || fr_is_long_header(&p))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	__u32 zero = 0;
	struct fr_config *cfg = fr_config.lookup(&zero);
	if (!cfg || cfg->host_cid_len > QUIC_MAX_CID_LEN)
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	__u32 cid_len = cfg->host_cid_len;
	struct fr_cid_key ck = {};
	ck.len = cid_len;
	if (cid_len > p.quic_end - p.quic_off - 1)
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	if (cid_len && bpf_skb_load_bytes(skb, p.quic_off + 1, ck.cid, cid_len & 0x1f))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	__u32 *upci = fr_cids.lookup(&ck);
	if (!upci)
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	__u32 uci = *upci;
	struct fr_conn *upconn = fr_conns.lookup(&uci);
	if (!upconn || upconn->role != FR_ROLE_UPSTREAM)
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	struct fr_short s = {};
	if (fr_parse_short(&p, cid_len, upconn->tag_len, &s))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);

	w->up_idx = upconn->role_idx;
	w->rec.up_idx = upconn->role_idx;
	w->rec.pn_len = s.pn_len;
	w->rec.size = p.quic_end - p.quic_off;
	w->off = s.payload_off;
	w->end = s.payload_end;
	w->pn_off = s.pn_off;
	w->csum_off = p.csum_off;
	w->cid_len = cid_len;

	/* Packet-level problems are known now; the walk still runs (without rewriting) so
	 * the punt record lists every stream range userspace must send. */
	if (conn->protection == FR_PROT_OFFLOAD_NOKEYS)
		w->punt = FR_PUNT_NO_KEYS;
	else if (conn->protection == FR_PROT_USERSPACE)
		w->punt = FR_PUNT_PROTECTED;
	else if (skb->gso_segs > 1)
		w->punt = FR_PUNT_GSO;
	else if (sub->family != p.family)
		w->punt = FR_PUNT_FAMILY;

	fr_progs.call(skb, FR_PROG_EG_WALK);
	return fr_eg_verdict(FR_EG_DROP_NO_PROG, bytes, TC_ACT_SHOT);
}

int fastpath_egress(struct __sk_buff *skb)
{
	__u32 bytes = skb->len;
	fr_count(FR_EG_SEEN, bytes);
	/* The crypto shim after us acts on our verdict only: none carried over (a clone
	 * still holds the ingress shim's). */
	skb->cb[FR_CB_VERDICT] = 0;
	__u32 mark = skb->mark;
	if ((mark & FR_MARK_MAGIC_MASK) == FR_MARK_MAGIC && (mark & FR_MARK_CLONE))
		return fr_egress_clone(skb, mark & FR_MARK_SUB_MASK, bytes);
	return fr_egress_user(skb, bytes);
}

/* List a STREAM frame in the clone's record. 0, or -1 if the record is full. */
static __always_inline int fr_record_frame(struct fr_scratch *w, const struct quic_frame *f,
					   __u64 sub_sid)
{
	__u32 n = w->rec.n_frames;
	if (n >= MAX_RECORD_FRAMES)
		return -1;
	struct fr_frame_rec *fr = &w->rec.frames[n & (MAX_RECORD_FRAMES - 1)];
	fr->sub_sid = sub_sid;
	fr->up_sid = f->sid;
	fr->offset = f->offset;
	fr->length = f->data_len;
	fr->type = f->type;
	fr->fin = f->fin;
	fr->action = FR_FA_FORWARDED;
	w->rec.n_frames = n + 1;
	return 0;
}

/* Plan the stream id of STREAM frame f to grow to the varint sid needs: an edit for the
 * send stage replacing the type byte and the id with [PADDING,] type, wider id (a
 * PADDING byte in front when the growth is odd, so the bytes behind keep their checksum
 * parity). 0, or -1 if it cannot be planned. */
static __always_inline int fr_plan_sid(struct fr_scratch *w, const struct quic_frame *f, __u64 sid)
{
	__u32 n = w->n_grow;
	__u32 size = quic_varint_min_size(sid), old = f->sid_size;
	if (n >= MAX_RECORD_FRAMES || size <= old || old < 1)
		return -1;
	__u32 i = n + 1;
	fr_barrier_var(i);
	if (i > MAX_RECORD_FRAMES)
		return -1;
	struct fr_grow_edit *e = &w->grow[i];
	__u32 pad = (size - old) & 1;
	e->start = f->start;
	e->old_len = 1 + old;
	e->new_len = 1 + size + pad;
	__builtin_memset(e->bytes, 0, FR_GROW_EDIT_MAX);
	if (pad) {
		e->bytes[1] = f->type;
		quic_varint_store(sid, size, e->bytes + 2);
	} else {
		e->bytes[0] = f->type;
		quic_varint_store(sid, size, e->bytes + 1);
	}
	w->n_grow = i;
	w->sid_delta += size - old + pad;
	return 0;
}

/* The subscriber's track alias over the upstream's in the MoQT header at [off, end) (a
 * subgroup header or an OBJECT_DATAGRAM: type varint, then the alias), at the same
 * width. 0, or a punt reason. */
static __always_inline __u32 fr_write_alias(struct __sk_buff *skb, struct fr_scratch *w, __u32 off,
					    __u32 end, __u64 up_alias, __u64 sub_alias)
{
	__u64 type = 0, alias = 0;
	__u32 n1 = 0, n2 = 0;
	if (quic_varint_load(skb, off, end, &type, &n1) ||
	    quic_varint_load(skb, off + n1, end, &alias, &n2) || alias != up_alias)
		return FR_PUNT_ALIAS_WIDTH;
	__u8 buf[FR_CSUM_MAX_WRITE] = {};
	if (quic_varint_store(sub_alias, n2, buf))
		return FR_PUNT_ALIAS_WIDTH;
	if (fr_csum_write(skb, w->csum_off, off + n1, buf, n2 & 0xf))
		return FR_PUNT_BAD_FRAME;
	return 0;
}

/* The STREAM frame f of a clone: translate (0), pad (0 and *zero set) or punt (a reason). */
static __always_inline __u32 fr_clone_stream(struct __sk_buff *skb, struct fr_scratch *w,
					     const struct quic_frame *f, int *zero)
{
	__u32 sub_idx = w->sub_idx;
	struct fr_sub *sub = fr_subs.lookup(&sub_idx);
	if (!sub)
		return FR_PUNT_NO_SUBSCRIBER;
	struct fr_sub_stream_key k = {.sub_idx = sub_idx, .up_idx = w->up_idx, .up_sid = f->sid};
	struct fr_sub_stream *ss = fr_sub_streams.lookup(&k);
	int pad = 0, fresh = 0;
	__u64 up_alias = 0, sub_alias = 0;

	if (!ss) {
		/* A subscriber gets a stream from its first byte or not at all. */
		struct fr_up_stream_key uk = {.up_idx = w->up_idx, .sid = f->sid};
		struct fr_up_stream *us = fr_up_streams.lookup(&uk);
		if (f->offset != 0 || !us || !(us->flags & FR_UPS_FORWARD)) {
			pad = 1;
		} else {
			struct fr_sub_track_key tk = {.sub_idx = sub_idx, .up_idx = w->up_idx,
						      .alias = us->alias};
			struct fr_sub_track *st = fr_sub_tracks.lookup(&tk);
			if (!st || us->group < st->start_group) {
				pad = 1;
			} else {
				struct fr_sub_stream nss = {};
				nss.max_stream_data = sub->initial_max_stream_data;
				if (us->priority > sub->priority_threshold) {
					nss.flags = FR_SS_SKIPPED;	/* skipped whole */
				} else {
					if (sub->next_uni_index >= sub->max_streams_uni)
						return fr_record_frame(w, f, FR_NO_SUB_SID) ?
							FR_PUNT_RECORD_FRAMES : FR_PUNT_NO_MAX_STREAMS;
					__u64 idx = __sync_fetch_and_add(&sub->next_uni_index, 1);
					nss.sub_sid = idx * 4 + QUIC_SID_SERVER_UNI;
				}
				if (fr_sub_streams.update(&k, &nss))
					return fr_record_frame(w, f, nss.sub_sid) ?
						FR_PUNT_RECORD_FRAMES : FR_PUNT_MAP_FULL;
				ss = fr_sub_streams.lookup(&k);
				if (!ss)
					return FR_PUNT_MAP_FULL;
				fresh = 1;	/* its subgroup header is in this frame */
				up_alias = us->alias;
				sub_alias = st->sub_alias;
			}
		}
	}
	__u64 stop = f->offset + f->data_len;
	if (ss && (ss->flags & FR_SS_SKIPPED))
		pad = 1;
	if (ss && !pad && stop <= ss->next_offset && !(f->fin && stop == ss->next_offset && f->data_len == 0))
		pad = 2;	/* publisher retransmission of a range already handed out */
	if (pad) {
		*zero = 1;
		return 0;
	}
	if (!ss)
		return fr_record_frame(w, f, FR_NO_SUB_SID) ? FR_PUNT_RECORD_FRAMES : FR_PUNT_MAP_FULL;
	/* From here the frame is listed in the record and its range handed out whatever
	 * happens: sent by the kernel, or by userspace if the copy is punted. */
	__u32 reason = 0;
	if (f->offset > ss->next_offset || f->offset + f->data_len < f->offset)
		; /* a gap (publisher packet lost on its way to us): forward, keep next_offset */
	else if (f->offset < ss->next_offset)
		reason = FR_PUNT_STREAM_OVERLAP;
	if (!reason && stop > ss->max_stream_data)
		reason = FR_PUNT_NO_STREAM_CREDIT;
	if (fr_record_frame(w, f, ss->sub_sid))
		return FR_PUNT_RECORD_FRAMES;
	if (f->offset <= ss->next_offset && stop > ss->next_offset) {
		w->new_bytes += stop - ss->next_offset;
		ss->next_offset = stop;
	}
	w->n_sent += 1;
	if (reason)
		return reason;

	if (w->punt)
		return 0;
	__u8 buf[FR_CSUM_MAX_WRITE] = {};
	if (quic_varint_store(ss->sub_sid, f->sid_size, buf)) {
		/* A wider varint: the send stage grows the packet (the walk goes on at the
		 * offsets as they are now). */
		if (fr_plan_sid(w, f, ss->sub_sid))
			return FR_PUNT_SID_GROW;
	} else if (fr_csum_write(skb, w->csum_off, f->sid_off, buf, f->sid_size & 0xf)) {
		return FR_PUNT_BAD_FRAME;
	}
	if (fresh && sub_alias != up_alias)
		return fr_write_alias(skb, w, f->data_off, f->data_off + f->data_len, up_alias, sub_alias);
	return 0;
}

/* Stage FR_PROG_EG_WALK: one frame of a clone. */
int fastpath_egress_walk(struct __sk_buff *skb)
{
	__u32 slot = FR_SCRATCH_EGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return TC_ACT_SHOT;
	__u32 off = w->off, end = w->end;
	if (off >= end) {
		fr_progs.call(skb, FR_PROG_EG_SEND);
		return fr_eg_verdict(FR_EG_DROP_NO_PROG, w->bytes, TC_ACT_SHOT);
	}
	if (w->steps >= MAX_FRAMES)
		return fr_punt_clone(w, w->punt ? w->punt : FR_PUNT_FRAME_LIMIT);
	w->steps += 1;

	struct quic_frame f = {};
	int r = quic_frame_parse(skb, off, end, &f);
	if (r == QUIC_WALK_BAD)
		return fr_punt_clone(w, w->punt ? w->punt : FR_PUNT_BAD_FRAME);
	if (r != QUIC_WALK_OK)
		return fr_punt_clone(w, w->punt ? w->punt : FR_PUNT_FRAME_LIMIT);

	__u32 t = f.type;
	__u32 reason = 0;
	int zero = 0;
	if (t >= QUIC_FRAME_STREAM && t <= QUIC_FRAME_STREAM_MAX) {
		reason = fr_clone_stream(skb, w, &f, &zero);
	} else if (t == QUIC_FRAME_DATAGRAM || t == QUIC_FRAME_DATAGRAM_LEN) {
		/* Forwarded as is when the subscriber gets the track, else padded. */
		__u64 type = 0, alias = 0, sub_alias = 0;
		__u32 n = 0, n2 = 0, dend = f.data_off + f.data_len;
		int mine = 0;
		if (!quic_varint_load(skb, f.data_off, dend, &type, &n) &&
		    !quic_varint_load(skb, f.data_off + n, dend, &alias, &n2)) {
			struct fr_sub_track_key tk = {.sub_idx = w->sub_idx, .up_idx = w->up_idx,
						      .alias = alias};
			struct fr_sub_track *st = fr_sub_tracks.lookup(&tk);
			if (st) {
				mine = 1;
				sub_alias = st->sub_alias;
			}
		}
		if (mine) {
			__u32 i = w->rec.n_frames;
			if (i >= MAX_RECORD_FRAMES) {
				reason = FR_PUNT_RECORD_FRAMES;
			} else {
				struct fr_frame_rec *fr = &w->rec.frames[i & (MAX_RECORD_FRAMES - 1)];
				fr->length = f.data_len;
				fr->type = t;
				fr->action = FR_FA_FORWARDED;
				w->rec.n_frames = i + 1;
				w->n_sent += 1;
				if (sub_alias != alias && !w->punt)
					reason = fr_write_alias(skb, w, f.data_off, dend, alias, sub_alias);
			}
		} else {
			zero = 1;
		}
	} else if (t != QUIC_FRAME_PADDING && t != QUIC_FRAME_PING) {
		/* The upstream connection's own frames (ACK, flow control, CIDs, ...). */
		zero = 1;
	}
	if (zero && !reason && !w->punt && fr_csum_zero(skb, w->csum_off, f.start, f.end))
		reason = FR_PUNT_FRAME_LIMIT;
	if (reason && !w->punt)
		w->punt = reason;
	w->off = f.end;
	fr_progs.call(skb, FR_PROG_EG_WALK);
	return fr_eg_verdict(FR_EG_DROP_NO_PROG, w->bytes, TC_ACT_SHOT);
}

/* --- resizing a clone ------------------------------------------------------------------
 *
 * When the subscriber's DCID has another length than the upstream's, its packet number
 * needs more bytes than the publisher wrote, or a stream id a wider varint, the packet
 * changes size once, here at the end (the walk wrote same-size fields in place and
 * planned the rest as edits in fr_scratch.grow[]): grow[0] the QUIC header (first byte,
 * DCID, PN, then a PADDING byte when the header's change is odd), grow[1..] stream ids.
 * Each edit changes the size by an even number of bytes, so every byte behind an edit
 * keeps its 16-bit parity and the UDP checksum changes only by the edited bytes and the
 * lengths. The bytes from the UDP header to the last edit are copied to fr_scratch.head,
 * bpf_skb_adjust_room(BPF_ADJ_ROOM_NET) adds (or removes) the room right behind the IP
 * header, which leaves everything after the last edit where it belongs, and the head is
 * written back with the edits in place, then the IP and UDP lengths and checksums. */

/* fr_scratch.head + at, at masked into the buffer (after a barrier, so clang keeps the
 * mask the verifier needs even where it knows at is in range). */
static __always_inline __u8 *fr_head_at(struct fr_scratch *w, __u64 at)
{
	fr_barrier_var(at);
	return w->head + (at & (FR_GROW_MAX_HEAD - 1));
}

/* Bytes the planned edits change the packet by, the header edit counted as grow[0]
 * would be for new DCID length dl and PN length npl. */
static __always_inline int fr_resize_delta(struct fr_scratch *w, __u32 dl, __u32 npl)
{
	int hd = (int)(dl + npl) - (int)(w->cid_len + w->rec.pn_len);
	return hd + (hd & 1) + w->sid_delta;
}

/* w->n_grow read afresh each time: a loop bounded by it leaves the verifier nothing
 * learnt about it, so the states after the loop merge whatever the count was. */
static __always_inline __u32 fr_n_grow(struct fr_scratch *w)
{
	return *(volatile __u32 *)&w->n_grow;
}

/* grow[0]: the subscriber's QUIC header at quic_off. */
static __always_inline void fr_plan_header(struct fr_scratch *w, const struct fr_sub *sub,
					   __u32 quic_off, __u8 first, __u32 dl, __u64 full, __u32 npl)
{
	struct fr_grow_edit *e = &w->grow[0];
	__u32 old = 1 + w->cid_len + w->rec.pn_len;
	__u32 new = 1 + dl + npl;
	__u32 pad = (new - old) & 1;
	e->start = quic_off;
	e->old_len = old;
	e->new_len = new + pad;
	__builtin_memset(e->bytes, 0, FR_GROW_EDIT_MAX);
	e->bytes[0] = (first & ~QUIC_PN_LEN_MASK) | ((npl - 1) & QUIC_PN_LEN_MASK);
	__builtin_memcpy(e->bytes + 1, sub->dcid, QUIC_MAX_CID_LEN);
	/* then the PN and a PADDING byte (0) over what the DCID array left past dl */
	__u32 at = 1 + dl;
	fr_barrier_var(at);
	if (at > 1 + QUIC_MAX_CID_LEN)
		return;
	__u32 sh = 8 * (npl - 1);
	e->bytes[at & 31] = full >> sh;
	e->bytes[(at + 1) & 31] = npl > 1 ? full >> (sh - 8) : 0;
	e->bytes[(at + 2) & 31] = npl > 2 ? full >> (sh - 16) : 0;
	e->bytes[(at + 3) & 31] = npl > 3 ? full : 0;
	e->bytes[(at + 4) & 31] = 0;
}

/* Move the bytes [from, skb->len) by delta (even, != 0) with the room made or taken at
 * the end of the packet (bpf_skb_change_tail), 64 bytes at a time, from the far end when
 * growing, through the upper half of fr_scratch.head. The UDP header stays where it is
 * (CHECKSUM_PARTIAL: csum_start points at it).
 * 0, -1, or 1 if more than FR_GROW_MAX_TAIL bytes would move. */
static __always_inline int fr_move_tail(struct __sk_buff *skb, struct fr_scratch *w, __u32 from,
					int delta)
{
	__u8 *b = w->head + FR_GROW_MAX_HEAD;	/* the half the head copy never uses */
	__u32 len = skb->len;
	if (from > len)
		return -1;
	if (len - from > FR_GROW_MAX_TAIL)
		return 1;
	/* Whole 64-byte blocks in the loop (one verifier state per step), the rest after:
	 * growing, blocks from the far end and the rest (the front) last; shrinking, the
	 * other way round, then the end is cut. */
	__u32 pos = delta > 0 ? len : from;
	if (delta > 0 && bpf_skb_change_tail(skb, len + delta, 0))
		return -1;
#pragma clang loop unroll(disable)
	for (int k = 0; k < FR_GROW_MAX_TAIL / 64; k++) {
		__u32 src;
		if (delta > 0) {
			if (pos - from < 64)
				break;
			src = pos - 64;
			pos = src;
		} else {
			if (len - pos < 64)
				break;
			src = pos;
			pos += 64;
		}
		if (bpf_skb_load_bytes(skb, src, b, 64) || bpf_skb_store_bytes(skb, src + delta, b, 64, 0))
			return -1;
	}
	__u64 r = delta > 0 ? pos - from : len - pos;
	__u32 src = delta > 0 ? from : pos;
	fr_barrier_var(r);
	if (r > 63)
		return -1;
	if (r && (bpf_skb_load_bytes(skb, src, b, r) || bpf_skb_store_bytes(skb, src + delta, b, r, 0)))
		return -1;
	if (delta < 0 && bpf_skb_change_tail(skb, len + delta, 0))
		return -1;
	return 0;
}

/* Bytes from the UDP header at l4 to the end of the last edit; 0 if out of bounds. */
static __always_inline __u64 fr_head_len(struct fr_scratch *w, __u32 l4)
{
	__u32 last = fr_n_grow(w);
	fr_barrier_var(last);
	if (last > MAX_RECORD_FRAMES)
		return 0;
	__u64 hlen = (__u64)w->grow[last].start + w->grow[last].old_len - l4;
	fr_barrier_var(hlen);
	if (hlen < FR_UDP_HLEN || hlen > FR_GROW_MAX_HEAD)
		return 0;
	return hlen;
}

/* Resize, first half: copy the head (UDP header to the last edit) to fr_scratch.head and
 * give it the new UDP length and checksum. The packet is not changed yet. 0 or -1. */
static __always_inline int fr_resize_prepare(struct __sk_buff *skb, struct fr_scratch *w,
					     const struct fr_pkt *p, int delta, int partial)
{
	__u32 l4 = p->l4_off;
	__u64 hlen = fr_head_len(w, l4);
	if (!hlen || bpf_skb_load_bytes(skb, l4, w->head, hlen))
		return -1;

	/* UDP length and checksum (RFC 1624): the edits' bytes and the length, which the
	 * checksum covers twice (UDP header and pseudo-header). IPv4 0: no checksum. */
	__u32 old_len = ((__u32)w->head[4] << 8) | w->head[5];
	__u32 new_len = old_len + delta;
	__u16 csum = ((__u16)w->head[6] << 8) | w->head[7];
	if (partial) {
		/* the pseudo-header's length only: the device sums the rest */
		csum = fr_fold((__u64)csum + (__u16)~old_len + (new_len & 0xffff));
		w->head[6] = csum >> 8;
		w->head[7] = csum;
	} else if (csum || p->family == 6) {
		__u64 sum = (__u16)~csum;
		__u32 x = l4;
#pragma clang loop unroll(disable)
		for (int i = 0; i <= MAX_RECORD_FRAMES; i++) {
			if (i > fr_n_grow(w))
				break;
			struct fr_grow_edit *e = &w->grow[i];
			__u32 at = e->start - l4;
			if (e->start < x || at >= FR_GROW_MAX_HEAD)
				return -1;
			sum += (__u16)~fr_csum_bytes32(fr_head_at(w, at), e->old_len, e->start);
			sum += fr_csum_bytes32(e->bytes, e->new_len, e->start);
			x = e->start + e->old_len;
		}
		sum += 2 * ((__u16)~old_len + (new_len & 0xffff));
		csum = ~fr_fold(sum);
		if (!csum)
			csum = 0xffff;
		w->head[6] = csum >> 8;
		w->head[7] = csum;
	}
	w->head[4] = new_len >> 8;
	w->head[5] = new_len;
	return 0;
}

/* Resize, second half (a fresh tail call: the verifier starts from one state): room
 * behind the IP header (the head moves), or at the end (the tail moves: at_tail, and
 * always for CHECKSUM_PARTIAL), then the head written back with the edits, then the IP
 * length. 0, -1 (the packet may be half written: the caller drops it), or 1 (the tail
 * is too long to move). */
static __always_inline int fr_resize_apply(struct __sk_buff *skb, struct fr_scratch *w,
					   const struct fr_pkt *p, int delta, int at_tail, int partial)
{
	__u32 l4 = p->l4_off;
	__u64 hlen = fr_head_len(w, l4);
	if (!hlen)
		return -1;
	if (delta && (at_tail || partial)) {
		int r = fr_move_tail(skb, w, l4 + hlen, delta);
		if (r)
			return r;
	} else if (delta && bpf_skb_adjust_room(skb, delta, BPF_ADJ_ROOM_NET, 0)) {
		return -1;
	}

	/* Write back: the bytes before each edit, then the edit, each moved by the change
	 * of the edits before it. */
	__u32 x = l4;
	int moved = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i <= MAX_RECORD_FRAMES; i++) {
		if (i > fr_n_grow(w))
			break;
		struct fr_grow_edit *e = &w->grow[i];
		__u64 seg = e->start - x;
		__u32 at = x - l4;
		fr_barrier_var(seg);
		if (seg > FR_GROW_MAX_HEAD || at >= FR_GROW_MAX_HEAD)
			return -1;
		if (seg && bpf_skb_store_bytes(skb, x + moved, fr_head_at(w, at), seg, 0))
			return -1;
		__u64 nl = e->new_len;
		fr_barrier_var(nl);
		if (nl < 1 || nl > FR_GROW_EDIT_MAX)
			return -1;
		if (bpf_skb_store_bytes(skb, e->start + moved, e->bytes, nl, 0))
			return -1;
		moved += (int)e->new_len - (int)e->old_len;
		x = e->start + e->old_len;
	}

	/* IP lengths */
	__u16 ipl = 0;
	__u32 ipl_off = p->family == 4 ? p->l3_off + 2 : p->l3_off + 4;
	if (bpf_skb_load_bytes(skb, ipl_off, &ipl, 2))
		return -1;
	__u16 nipl = bpf_htons(bpf_ntohs(ipl) + delta);
	if (p->family == 4 && bpf_l3_csum_replace(skb, p->l3_off + 10, ipl, nipl, 2))
		return -1;
	return bpf_skb_store_bytes(skb, ipl_off, &nipl, 2, 0) ? -1 : 0;
}

/* The end of a clone's send stage: UDP ports, IP addresses (pseudo-header and IPv4
 * header checksums), MACs, the subscriber's counters, the record, the shim's verdict. */
static __always_inline int fr_send_finish(struct __sk_buff *skb, struct fr_scratch *w,
					  struct fr_sub *sub, const struct fr_conn *conn, __u32 ci,
					  const struct fr_pkt *p, __u32 bytes)
{
	__u32 size = w->rec.size;
	__u32 csum_off = p->csum_off;

	if (fr_csum_port(skb, p->l4_off, csum_off, p->sport, sub->src_port) ||
	    fr_csum_port(skb, p->l4_off + 2, csum_off, p->dport, sub->dst_port))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	if (p->family == 4) {
		__u32 os = 0, od = 0, ns = 0, nd = 0;
		__builtin_memcpy(&os, p->saddr, 4);
		__builtin_memcpy(&od, p->daddr, 4);
		__builtin_memcpy(&ns, sub->src_addr, 4);
		__builtin_memcpy(&nd, sub->dst_addr, 4);
		if (fr_csum_addr_word(skb, p->l3_off + 12, p->l3_off + 10, csum_off, os, ns) ||
		    fr_csum_addr_word(skb, p->l3_off + 16, p->l3_off + 10, csum_off, od, nd))
			return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	} else {
#pragma clang loop unroll(disable)
		for (int k = 0; k < 4; k++) {
			__u32 os = 0, od = 0, ns = 0, nd = 0;
			__builtin_memcpy(&os, p->saddr + 4 * k, 4);
			__builtin_memcpy(&od, p->daddr + 4 * k, 4);
			__builtin_memcpy(&ns, sub->src_addr + 4 * k, 4);
			__builtin_memcpy(&nd, sub->dst_addr + 4 * k, 4);
			if (fr_csum_addr_word(skb, p->l3_off + 8 + 4 * k, -1, csum_off, os, ns) ||
			    fr_csum_addr_word(skb, p->l3_off + 24 + 4 * k, -1, csum_off, od, nd))
				return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
		}
	}
	__u8 macs[12];
	__builtin_memcpy(macs, sub->dst_mac, 6);
	__builtin_memcpy(macs + 6, sub->src_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, 12, 0))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);

	__sync_fetch_and_add(&sub->data_used, w->new_bytes);
	__sync_fetch_and_add(&sub->bytes_in_flight, size);
	fr_emit_scratch(w);
	fr_set_cb(skb, conn, ci, p->quic_off, sub->dcid_len, w->rec.pn_len, 1, w->rec.wire_pn, 1);
	return fr_eg_verdict(FR_EG_SENT_CLONE, bytes, TC_ACT_UNSPEC);
}

/* fastpath_egress_send re-entered (resize_phase 1; rec.wire_pn, resize_pn_len and
 * resize_delta decided): resize, then finish. A tail call of its own so the
 * verifier starts it from one state. A failure withholds the clone (its ranges are
 * userspace's). */
static __always_inline int fr_send_resized(struct __sk_buff *skb, struct fr_scratch *w)
{
	__u32 bytes = w->bytes;
	w->resize_phase = 0;
	__u32 sub_idx = w->sub_idx;
	struct fr_sub *sub = fr_subs.lookup(&sub_idx);
	if (!sub)
		return fr_punt_clone(w, FR_PUNT_NO_SUBSCRIBER);
	__u32 ci = sub->conn_idx;
	struct fr_conn *conn = fr_conns.lookup(&ci);
	if (!conn)
		return fr_punt_clone(w, FR_PUNT_NO_SUBSCRIBER);
	struct fr_pkt p = {};
	if (fr_parse_udp(skb, &p))
		return fr_punt_clone(w, FR_PUNT_RESIZE_FAILED);
	int delta = w->resize_delta;
	__u32 npl = w->resize_pn_len, dl = sub->dcid_len;
	if (npl < 1 || npl > 4 || dl > QUIC_MAX_CID_LEN)
		return fr_punt_clone(w, FR_PUNT_RESIZE_FAILED);
	int partial = fr_csum_is_partial(skb, p.csum_off);
	if (partial < 0)
		return fr_punt_clone(w, FR_PUNT_RESIZE_FAILED);
	__u32 zero = 0;
	struct fr_config *cfg = fr_config.lookup(&zero);
	int at_tail = cfg && (cfg->flags & FR_CFG_RESIZE_AT_TAIL);
	__u8 first = (p.first & ~QUIC_SHORT_KEY_PHASE) | (conn->key_phase ? QUIC_SHORT_KEY_PHASE : 0);
	fr_plan_header(w, sub, p.quic_off, first, dl, w->rec.wire_pn, npl);
	if (fr_resize_prepare(skb, w, &p, delta, partial))
		return fr_punt_clone(w, FR_PUNT_RESIZE_FAILED);
	int r = fr_resize_apply(skb, w, &p, delta, at_tail, partial);
	if (r)
		return fr_punt_clone(w, r > 0 && partial ? FR_PUNT_RESIZE_PARTIAL : FR_PUNT_RESIZE_FAILED);
	w->rec.size += delta;
	w->rec.pn_len = npl;
	fr_count(FR_EG_RESIZED, bytes);
	return fr_send_finish(skb, w, sub, conn, ci, &p, bytes);
}

/* Stage FR_PROG_EG_SEND: credit, congestion, PN, header rewrite (or resize), record. */
int fastpath_egress_send(struct __sk_buff *skb)
{
	__u32 slot = FR_SCRATCH_EGRESS;
	struct fr_scratch *w = fr_scratch.lookup(&slot);
	if (!w)
		return TC_ACT_SHOT;
	if (w->resize_phase)
		return fr_send_resized(skb, w);
	__u32 bytes = w->bytes;
	if (w->punt)
		return fr_punt_clone(w, w->punt);
	if (!w->n_sent)
		return fr_eg_verdict(FR_EG_DROP_EMPTY, bytes, TC_ACT_SHOT);

	__u32 sub_idx = w->sub_idx;
	struct fr_sub *sub = fr_subs.lookup(&sub_idx);
	if (!sub)
		return fr_punt_clone(w, FR_PUNT_NO_SUBSCRIBER);
	__u32 ci = sub->conn_idx;
	struct fr_conn *conn = fr_conns.lookup(&ci);
	if (!conn)
		return fr_punt_clone(w, FR_PUNT_NO_SUBSCRIBER);
	__u32 pn_len = w->rec.pn_len;
	__u32 dl = sub->dcid_len;
	if (pn_len < 1 || pn_len > 4 || dl > QUIC_MAX_CID_LEN || w->cid_len > QUIC_MAX_CID_LEN)
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	/* Check-then-add: clones of one subscriber come from one CPU's softirq; a race with
	 * userspace's resync can overshoot by one packet. */
	if (sub->data_used + w->new_bytes > sub->max_data)
		return fr_punt_clone(w, FR_PUNT_NO_CREDIT);
	/* The size on the wire (a packet number that grows adds a few bytes more: left out,
	 * like the race with userspace's resync). */
	int delta = fr_resize_delta(w, dl, pn_len);
	if (sub->bytes_in_flight + w->rec.size + delta > sub->cwnd)
		return fr_punt_clone(w, FR_PUNT_NO_CWND);

	struct fr_pkt p = {};
	if (fr_parse_udp(skb, &p))
		return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	__u64 full = __sync_fetch_and_add(&sub->next_pn, 1);
	w->rec.wire_pn = full;
	__u32 npl = quic_pn_len_needed_flat(full, sub->largest_acked);
	if (npl > 4)
		return fr_punt_clone(w, FR_PUNT_PN_GROW);
	if (npl < pn_len)
		npl = pn_len;

	__u32 csum_off = p.csum_off;
	__u8 buf[FR_CSUM_MAX_WRITE] = {};
	__u8 first = (p.first & ~QUIC_SHORT_KEY_PHASE) | (conn->key_phase ? QUIC_SHORT_KEY_PHASE : 0);
	if (dl != w->cid_len || npl != pn_len || w->n_grow) {
		/* Fields change size: within the subscriber's limit, resize the packet. */
		/* punted for the first field that grows: DCID, PN, stream ids */
		__u32 why = dl > w->cid_len ? FR_PUNT_CID_LEN :
			    npl != pn_len ? FR_PUNT_PN_GROW : FR_PUNT_SID_GROW;
		delta = fr_resize_delta(w, dl, npl);
		__u64 size = (__u64)w->rec.size + delta;
		if (delta > 0 && (!sub->max_udp_payload || size > sub->max_udp_payload))
			return fr_punt_clone(w, why);
		__u32 last = w->n_grow;
		fr_barrier_var(last);
		if (last > MAX_RECORD_FRAMES)
			return fr_punt_clone(w, why);
		if ((__u64)w->grow[last].start + w->grow[last].old_len - p.l4_off > FR_GROW_MAX_HEAD &&
		    last)
			return fr_punt_clone(w, FR_PUNT_SID_GROW);
		w->resize_pn_len = npl;
		w->resize_delta = delta;
		w->resize_phase = 1;
		fr_progs.call(skb, FR_PROG_EG_SEND);
		w->resize_phase = 0;
		return fr_punt_clone(w, FR_PUNT_RESIZE_FAILED);
	} else {
		/* QUIC: first byte (key phase), DCID, packet number, in place. */
		if (first != p.first) {
			buf[0] = first;
			if (fr_csum_write(skb, csum_off, p.quic_off, buf, 1))
				return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
		}
		if (dl) {
			__builtin_memcpy(buf, sub->dcid, QUIC_MAX_CID_LEN);
			if (fr_csum_write(skb, csum_off, p.quic_off + 1, buf, dl))
				return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
		}
		__builtin_memset(buf, 0, sizeof(buf));
		quic_pn_store(full, pn_len, buf);
		if (fr_csum_write(skb, csum_off, w->pn_off, buf, pn_len))
			return fr_eg_verdict(FR_EG_DROP_BAD_CLONE, bytes, TC_ACT_SHOT);
	}
	return fr_send_finish(skb, w, sub, conn, ci, &p, bytes);
}

/* Not attached anywhere: userspace runs it with BPF_PROG_TEST_RUN on a frame carrying a
 * struct fr_sub_op at FR_SUB_OP_OFF to change a live subscriber without racing the
 * egress program's atomics (structs.h). The op comes back with old and status. */
int fastpath_sub_op(struct __sk_buff *skb)
{
	struct fr_sub_op op = {};
	if (bpf_skb_load_bytes(skb, FR_SUB_OP_OFF, &op, sizeof(op)))
		return TC_ACT_SHOT;
	__u32 idx = op.sub_idx;
	struct fr_sub *sub = fr_subs.lookup(&idx);
	op.status = -1;
	if (sub) {
		__u32 off = op.offset;
		if ((op.op == FR_SUB_OP_ADD || op.op == FR_SUB_OP_STORE) &&
		    off < FR_SUB_COUNTERS_END && !(off & 7)) {
			__u64 *field = (__u64 *)((__u8 *)sub + (off & 0x78));
			if (op.op == FR_SUB_OP_ADD) {
				op.old = __sync_fetch_and_add(field, op.value);
			} else {
				op.old = *field;
				*field = op.value;
			}
			op.status = 0;
		} else if (op.op == FR_SUB_OP_WRITE && off >= FR_SUB_COUNTERS_END &&
			   op.len <= 64 && off + op.len <= sizeof(struct fr_sub)) {
			__u8 *dst = (__u8 *)sub;
#pragma clang loop unroll(disable)
			for (__u32 k = 0; k < 64; k++) {
				if (k >= op.len)
					break;
				__u64 at = off + k;
				fr_barrier_var(at);	/* no strength-reduced pointer: check this one */
				if (at >= sizeof(struct fr_sub))
					break;
				dst[at] = op.data[k & 63];
			}
			op.status = 0;
		}
	}
	bpf_skb_store_bytes(skb, FR_SUB_OP_OFF, &op, sizeof(op), 0);
	return TC_ACT_OK;
}

/* Like fastpath_sub_op, for one fr_sub_streams entry (struct fr_stream_op). */
int fastpath_stream_op(struct __sk_buff *skb)
{
	struct fr_stream_op op = {};
	if (bpf_skb_load_bytes(skb, FR_SUB_OP_OFF, &op, sizeof(op)))
		return TC_ACT_SHOT;
	struct fr_sub_stream_key k = op.key;
	struct fr_sub_stream *ss = fr_sub_streams.lookup(&k);
	op.status = -1;
	__u32 off = op.offset;
	if (ss && off < 24 && !(off & 7) && (op.op == FR_SUB_OP_ADD || op.op == FR_SUB_OP_STORE)) {
		__u64 *field = (__u64 *)((__u8 *)ss + (off & 0x18));
		if (op.op == FR_SUB_OP_ADD) {
			op.old = __sync_fetch_and_add(field, op.value);
		} else {
			op.old = *field;
			*field = op.value;
		}
		op.status = 0;
	}
	bpf_skb_store_bytes(skb, FR_SUB_OP_OFF, &op, sizeof(op), 0);
	return TC_ACT_OK;
}
