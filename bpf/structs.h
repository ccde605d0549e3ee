/* structs.h: layouts the fast path shares with the crypto shim and with Python.
 *
 * Every struct has explicit padding and natural alignment, so its C layout is the
 * ctypes layout: relay/fastpath/layout.py mirrors each one and
 * tests/kernel/test_fastpath_layout.py compiles a sizeof/offsetof probe of this file
 * with bcc and compares field by field. Change both together. Multi-byte integers are
 * host order unless the comment says network order (NBO).
 */
#ifndef FASTRELAY_STRUCTS_H
#define FASTRELAY_STRUCTS_H

#include "consts.h"

/* === skb verdict contract: fast path <-> crypto shim <-> clone ==========================
 *
 * skb->mark, clones only (ingress fast path -> egress fast path on the subscriber's
 * device; the mark survives bpf_clone_redirect, toolchain.md §8):
 *   bits 31..24  FR_MARK_MAGIC
 *   bit  23      FR_MARK_CLONE
 *   bits 15..0   subscriber index (fr_subs)
 * The ingress program restores the original's mark after cloning; the egress program
 * clears the clone's mark before it leaves.
 *
 * skb->cb[] (struct __sk_buff cb[0..4]), between programs on the same hook:
 *   cb[FR_CB_VERDICT] = FR_CB_MAGIC | FR_CB_* flags
 *   cb[FR_CB_CONN]    = connection index (fr_conns)
 *   cb[FR_CB_LAYOUT]  = QUIC header offset in the frame | DCID length << 16 | PN length << 24
 *   cb[FR_CB_PN_LO], cb[FR_CB_PN_HI] = the full packet number the fast path wrote (with
 *                       FR_CB_HAVE_PN: subscriber packets it renumbered, clones)
 * ingress: the shim runs first and clears cb[FR_CB_VERDICT] of every packet (no stale
 *          verdict passes); after the tag verified and the payload is plaintext it writes
 *          FR_CB_VERIFIED with the connection index userspace gave its shim entry. The
 *          fast path forwards a packet of an offloaded connection only with that verdict
 *          for that connection.
 * egress:  the fast path runs first; for a 1-RTT packet of a connection offloaded with
 *          keys it writes FR_CB_PROTECT (+ FR_CB_CLONE for clones, + FR_CB_HAVE_PN with the
 *          packet number it wrote) and the layout; it clears the verdict of everything
 *          else first. The shim protects with the keys of the destination's address (a
 *          clone carries the subscriber's addresses by then) and the exact packet number;
 *          an FR_CB_PROTECT packet the shim holds no keys for is dropped, never sent in
 *          plaintext. A connection offloaded without keys never gets here (dropped).
 * Filter order (priorities, lower first; relay/fastpath/loader.py, crypto_backends/soft.py):
 *   ingress shim 20 < fast path 30; egress fast path 10 < shim 20. Every program hands on
 *   with TC_ACT_UNSPEC (TC_ACT_OK would end the chain) or drops with TC_ACT_SHOT.
 */
#define FR_MARK_MAGIC_MASK 0xFF000000u
#define FR_MARK_MAGIC 0xFA000000u
#define FR_MARK_CLONE 0x00800000u
#define FR_MARK_SUB_MASK 0x0000FFFFu

#define FR_CB_VERDICT 0
#define FR_CB_CONN 1
#define FR_CB_LAYOUT 2
#define FR_CB_PN_LO 3
#define FR_CB_PN_HI 4
#define FR_CB_MAGIC_MASK 0xFFFF0000u
#define FR_CB_MAGIC 0xFA570000u
#define FR_CB_VERIFIED 0x1u		/* ingress, shim -> fast path: tag verified, payload in clear */
#define FR_CB_PROTECT 0x2u		/* egress, fast path -> shim: protect with the connection's keys */
#define FR_CB_CLONE 0x4u		/* egress: the packet is a fast-path clone */
#define FR_CB_HAVE_PN 0x8u		/* egress: cb[FR_CB_PN_LO/HI] hold the full packet number */

/* === per-connection state =============================================================== */

/* fr_conn.role */
#define FR_ROLE_NONE 0
#define FR_ROLE_UPSTREAM 1		/* publisher-side: its packets are cloned */
#define FR_ROLE_SUBSCRIBER 2		/* subscriber-side: clones and userspace packets renumbered */

/* fr_conn.protection: how the connection's 1-RTT packets are protected (DESIGN.md). */
#define FR_PROT_CLEAR 0			/* --crypto none: plaintext on the wire, no tag */
#define FR_PROT_OFFLOAD_KEYS 1		/* shim/NIC protects; keys installed */
#define FR_PROT_OFFLOAD_NOKEYS 2	/* shim/NIC protects; keys not yet installed: egress drops */
#define FR_PROT_USERSPACE 3		/* aioquic protects: the fast path leaves it untouched */

/* fr_config: global settings, one entry. */
#define FR_CFG_RESIZE_AT_TAIL 0x1	/* resize every clone by moving the bytes behind its last
					 * edit (as CHECKSUM_PARTIAL clones always are) instead of
					 * moving the head into room made behind the IP header */
struct fr_config {
	__u32 host_cid_len;		/* length of every relay-chosen CID (short-header demux) */
	__u32 flags;			/* FR_CFG_* (0: none) */
};

/* fr_cids key: a relay-chosen connection id (ingress demux). Unused bytes are 0. */
struct fr_cid_key {
	__u8 len;
	__u8 cid[QUIC_MAX_CID_LEN];
	__u8 _pad[3];
};

/* fr_peers key: a peer's address as the relay sends to it (egress demux of userspace
 * packets). IPv4: addr[0..3], the rest 0. */
struct fr_addr_key {
	__u8 addr[16];
	__u16 port;			/* NBO */
	__u8 family;			/* 4 or 6 */
	__u8 _pad;
};

/* fr_conns value, indexed by connection index; shared with the crypto shim. */
struct fr_conn {
	__u8 role;			/* FR_ROLE_* */
	__u8 protection;		/* FR_PROT_* */
	__u8 tag_len;			/* bytes of tag slot after the payload (0 or 16) */
	__u8 key_phase;			/* current key phase bit written on egress (0/1) */
	__u32 role_idx;			/* index in fr_upstreams or fr_subs */
	__u32 flags;			/* reserved, 0 */
	__u8 peer_cid_len;		/* DCID length of packets we send on it (the peer's CID) */
	__u8 _pad[3];
};

/* fr_upstreams value: the subscribers an upstream connection fans out to. */
struct fr_upstream {
	__u32 n_subs;			/* entries used in subs[]; more than the array holds is counted */
	__u32 _pad;
	__u32 subs[MAX_SUBSCRIBERS_PER_UPSTREAM];	/* subscriber indexes (fr_subs) */
};

/* fr_sub.flags */
#define FR_SUB_ACTIVE 0x1		/* slot in use: clones may go to it */

/* "nothing acknowledged yet" in fr_sub.largest_acked */
#define FR_PN_NONE 0xFFFFFFFFFFFFFFFFull

/* fr_subs value: one subscriber connection as the egress program writes for it.
 * Fields marked atomic are changed with __sync_fetch_and_add by both the kernel and
 * userspace; the others are written by userspace only. */
struct fr_sub {
	__u64 next_pn;			/* atomic: next 1-RTT packet number on the wire */
	__u64 largest_acked;		/* largest PN the subscriber acknowledged, FR_PN_NONE if none */
	__u64 next_uni_index;		/* atomic: next server uni stream index (id = 4 * index + 3) */
	__u64 max_streams_uni;		/* peer MAX_STREAMS (uni): indexes below may be opened */
	__u64 max_data;			/* peer MAX_DATA */
	__u64 data_used;		/* atomic: MAX_DATA credit used by both paths */
	__u64 initial_max_stream_data;	/* peer's initial MAX_STREAM_DATA for streams we open (uni) */
	__u64 cwnd;			/* congestion window (bytes) */
	__u64 bytes_in_flight;		/* atomic: kernel adds forwarded bytes, userspace resyncs */
	__u32 conn_idx;			/* fr_conns index of this connection */
	__u32 ifindex;			/* device the clones are redirected to */
	__u32 flags;			/* FR_SUB_* */
	__u32 max_udp_payload;		/* UDP payload bytes a grown clone may have: min(the peer's
					 * max_udp_payload_size, validated path MTU - IP/UDP headers);
					 * 0 = unknown: clones that must grow are punted */
	__u8 family;			/* 4 or 6 */
	__u8 dcid_len;			/* length of dcid */
	__u8 priority_threshold;	/* streams whose publisher priority is > this are skipped whole */
	__u8 _pad0;
	__u8 dcid[QUIC_MAX_CID_LEN];	/* the DCID written toward the subscriber */
	__u8 src_mac[6];		/* relay interface MAC */
	__u8 dst_mac[6];		/* next hop toward the subscriber */
	__u8 src_addr[16];		/* relay address toward the subscriber (IPv4: first 4 bytes) */
	__u8 dst_addr[16];		/* subscriber address */
	__u16 src_port;			/* NBO: relay port */
	__u16 dst_port;			/* NBO: subscriber port */
	__u32 _pad1;
};

/* Userspace's changes to a live fr_sub go through fastpath_sub_op (BPF_PROG_TEST_RUN,
 * frame offset FR_SUB_OP_OFF), never a whole-value map update, which would race with
 * the egress program's atomics: ADD and STORE act on one u64 counter field (offset
 * < FR_SUB_COUNTERS_END, multiple of 8), WRITE copies len bytes into the fields after
 * the counters. A whole-value update is fine while the slot is not FR_SUB_ACTIVE. */
#define FR_SUB_OP_OFF 14		/* after a zeroed Ethernet header */
#define FR_SUB_OP_ADD 1			/* old = fetch_add(field, value) */
#define FR_SUB_OP_STORE 2		/* old = field; field = value */
#define FR_SUB_OP_WRITE 3		/* copy data[0..len) to offset */
#define FR_SUB_COUNTERS_END 72		/* the nine u64 fields */
struct fr_sub_op {
	__u32 sub_idx;
	__u8 op;			/* FR_SUB_OP_* */
	__u8 len;			/* WRITE: bytes of data (<= 64) */
	__u16 offset;			/* byte offset in struct fr_sub */
	__u64 value;			/* ADD, STORE */
	__u64 old;			/* out: value before (ADD, STORE) */
	__s32 status;			/* out: 0 done, -1 refused */
	__u32 _pad;
	__u8 data[64];			/* WRITE */
};

/* === tracks and streams ================================================================= */

/* fr_tracks key/value: a track of an upstream connection whose data the kernel forwards. */
struct fr_track_key {
	__u32 up_idx;
	__u32 _pad;
	__u64 alias;			/* upstream track alias */
};
#define FR_TRACK_FORWARD 0x1
struct fr_track {
	__u32 flags;			/* FR_TRACK_* */
	__u32 _pad;
};

/* fr_sub_tracks key/value: subscriber sub_idx receives the upstream's track alias. */
struct fr_sub_track_key {
	__u32 sub_idx;
	__u32 up_idx;
	__u64 alias;			/* upstream track alias */
};
struct fr_sub_track {
	__u64 sub_alias;		/* alias in the subscriber's session: egress writes it over the
					 * upstream's alias (subgroup header at offset 0, OBJECT_DATAGRAM)
					 * at the upstream's varint width; one that does not fit is punted */
	__u32 flags;			/* reserved, 0 */
	__u32 _pad;
	__u64 start_group;		/* streams of earlier groups are not this subscriber's: the
					 * relay serves them (joining FETCH, or from mid-stream) */
};

/* fr_up_streams key/value: an upstream stream the ingress program saw start (offset 0). */
struct fr_up_stream_key {
	__u32 up_idx;
	__u32 _pad;
	__u64 sid;			/* upstream stream id */
};
#define FR_UPS_FORWARD 0x1		/* its STREAM frames are cloned */
struct fr_up_stream {
	__u64 alias;			/* track alias from the subgroup header */
	__u32 flags;			/* FR_UPS_* */
	__u8 priority;			/* publisher priority from the subgroup header */
	__u8 _pad[3];
	__u64 group;			/* group id from the subgroup header */
};

/* fr_sub_streams key/value: how one subscriber gets one upstream stream. */
struct fr_sub_stream_key {
	__u32 sub_idx;
	__u32 up_idx;
	__u64 up_sid;
};
#define FR_SS_SKIPPED 0x1		/* not forwarded to this subscriber (priority): padded whole */
struct fr_sub_stream {
	__u64 sub_sid;			/* stream id in the subscriber's space */
	__u64 next_offset;		/* contiguous bytes from 0 already handed out (kernel or punt) */
	__u64 max_stream_data;		/* peer MAX_STREAM_DATA for sub_sid */
	__u32 flags;			/* FR_SS_* */
	__u32 _pad;
};

/* Userspace's changes to a live fr_sub_streams entry (MAX_STREAM_DATA, ...) go through
 * fastpath_stream_op like fr_sub_op: ADD and STORE on one u64 field (offset < 24,
 * multiple of 8). Deleting an entry is a plain map delete. */
struct fr_stream_op {
	struct fr_sub_stream_key key;
	__u8 op;			/* FR_SUB_OP_ADD or FR_SUB_OP_STORE */
	__u8 _pad0;
	__u16 offset;			/* byte offset in struct fr_sub_stream */
	__u32 _pad1;
	__u64 value;
	__u64 old;			/* out */
	__s32 status;			/* out: 0 done, -1 refused (no entry, bad field) */
	__u32 _pad2;
};

/* === counters ============================================================================ */

/* fr_stats value, per CPU, indexed by reason (reasons.h). */
struct fr_counter {
	__u64 packets;
	__u64 bytes;
};

/* === ring records (kernel -> userspace) ================================================== */

/* fr_record.kind */
#define FR_REC_SENT_CLONE 1		/* a clone left for the subscriber */
#define FR_REC_SENT_USER 2		/* a userspace packet left renumbered */
#define FR_REC_PUNT_CLONE 3		/* a clone was withheld: userspace sends those bytes */
#define FR_REC_PUNT_USER 4		/* a userspace packet was withheld */

/* fr_frame_rec.action */
#define FR_FA_FORWARDED 1		/* carried in this copy */
#define FR_FA_PADDED_RETX 2		/* range already handed out: overwritten with PADDING */
#define FR_FA_PADDED_SKIP 3		/* stream not for this subscriber: overwritten with PADDING */
#define FR_FA_PUNTED 4			/* the copy was withheld: userspace must send this range */

/* fr_frame_rec.sub_sid of a punted frame whose stream has no subscriber id yet
 * (MAX_STREAMS reached): userspace opens the stream itself. */
#define FR_NO_SUB_SID 0xFFFFFFFFFFFFFFFFull

/* One STREAM or DATAGRAM frame of a clone. */
struct fr_frame_rec {
	__u64 sub_sid;			/* stream id toward the subscriber (STREAM) */
	__u64 up_sid;			/* upstream stream id (STREAM) */
	__u64 offset;			/* stream offset (STREAM) */
	__u32 length;			/* data bytes */
	__u8 type;			/* frame type byte (0x08..0x0f, 0x30, 0x31) */
	__u8 action;			/* FR_FA_* */
	__u8 fin;			/* STREAM FIN bit */
	__u8 _pad;
};

struct fr_record {
	__u8 kind;			/* FR_REC_* */
	__u8 reason;			/* punt reason (reasons.h), 0 for sent */
	__u8 n_frames;			/* used entries of frames[] */
	__u8 pn_len;			/* bytes of packet number on the wire */
	__u32 sub_idx;
	__u32 conn_idx;
	__u32 up_idx;			/* clones: upstream index; else 0 */
	__u64 wire_pn;			/* full packet number given on the wire */
	__u64 ts_ns;			/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 size;			/* UDP payload bytes */
	__u32 built_pn;			/* userspace packets: the PN bytes userspace wrote */
	struct fr_frame_rec frames[MAX_RECORD_FRAMES];
};

/* === scratch ============================================================================ */

/* One field of a clone that changes size (egress): old_len bytes at start (frame offset
 * before the resize) become new_len bytes. new_len - old_len is even (a PADDING byte is
 * added where needed), so every byte behind keeps its checksum parity. */
#define FR_GROW_EDIT_MAX 32		/* QUIC header: first byte, 20-byte DCID, 4-byte PN, PADDING */
#define FR_GROW_MAX_HEAD 512		/* the last edit ends at most this far after the UDP header */
#define FR_GROW_MAX_TAIL 2048		/* bytes moved behind the last edit when resizing at the tail */
struct fr_grow_edit {
	__u32 start;
	__u8 old_len;
	__u8 new_len;
	__u8 _pad[2];
	__u8 bytes[FR_GROW_EDIT_MAX];	/* the new bytes */
};

/* fr_scratch value (per CPU): walker state kept in a map value so that the verifier
 * forgets the per-path ranges of offsets between frames and merges states (otherwise
 * every frame doubles the paths it explores). Not read by userspace. */
#define FR_SCRATCH_INGRESS 0		/* ingress and its tail calls */
#define FR_SCRATCH_EGRESS 1		/* egress (runs nested inside ingress's clone loop) */
struct fr_scratch {
	__u32 off;			/* next frame */
	__u32 end;			/* end of the frames */
	__u32 forwarded;		/* ingress: a forwarded frame was seen */
	__u32 steps;			/* walker calls so far (bounded by MAX_FRAMES) */
	__u32 up_idx;			/* upstream index of the packet */
	__u32 conn_idx;			/* connection index of the packet */
	__u32 sub_idx;			/* egress: subscriber index */
	__u32 bytes;			/* skb->len at entry */
	__u32 pn_off;			/* egress: packet number offset */
	__u32 csum_off;			/* egress: UDP checksum offset */
	__u64 new_bytes;		/* egress: stream bytes beyond what was handed out before */
	__u32 n_frames;			/* egress: record frames used */
	__u32 n_sent;			/* egress: frames carried */
	__u32 punt;			/* egress: punt reason, 0 if none */
	__u32 ring_count;		/* egress: records submitted on this CPU (wakeup pacing) */
	struct fr_record rec;		/* egress: the record being built */
	/* egress, fields that change size (fastpath_egress_send resizes the packet once): */
	__u32 cid_len;			/* DCID length of the clone (the relay's host CID length) */
	__u32 n_grow;			/* stream-id edits in grow[1..n_grow] */
	struct fr_grow_edit grow[MAX_RECORD_FRAMES + 1];	/* [0] QUIC header, then stream ids */
	__u8 head[2 * FR_GROW_MAX_HEAD];	/* bytes from the UDP header to the last edit, as they were */
	__s32 sid_delta;		/* bytes the stream-id edits add */
	__u32 resize_phase;		/* 1: fastpath_egress_send re-entered to apply the resize */
	__s32 resize_delta;		/* bytes the resize adds (even; < 0 shrinks) */
	__u32 resize_pn_len;		/* the subscriber's PN length (rec.pn_len is the publisher's until then) */
};

#endif /* FASTRELAY_STRUCTS_H */
