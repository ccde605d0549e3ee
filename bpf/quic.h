/* quic.h: QUIC varints (RFC 9000 §16), packet-number encoding (§17.1, Appendix A.2) and a
 * bounded frame walker for the frame types QUIC stacks send in 1-RTT packets (§19, RFC 9221).
 *
 * Everything reads through bpf_skb_load_bytes with an explicit end check first; loops
 * have constant bounds and unrolling disabled (toolchain.md §7).
 */
#ifndef FASTRELAY_QUIC_H
#define FASTRELAY_QUIC_H

#include "consts.h"

/* Bytes of a varint from its first byte. */
static __always_inline __u32 quic_varint_size(__u8 first)
{
	return 1u << (first >> 6);
}

/* Bytes the shortest varint encoding of v needs (1, 2, 4 or 8; 0 if v >= 2^62). */
static __always_inline __u32 quic_varint_min_size(__u64 v)
{
	if (v < (1ull << 6))
		return 1;
	if (v < (1ull << 14))
		return 2;
	if (v < (1ull << 30))
		return 4;
	if (v < (1ull << 62))
		return 8;
	return 0;
}

/* The 8 bytes at off as a big-endian u64, zero past plen (>= 8, the packet length).
 * Always loads 8 bytes (from plen - 8 near the end, then shifts), so no load size
 * depends on off: the verifier keeps off imprecise and merges walker states. */
static __always_inline int fr_load_be64(struct __sk_buff *skb, __u32 off, __u32 plen, __u64 *out)
{
	__u8 b[8];
	if (off >= plen || plen < 8)
		return -1;
	__u32 pos = off;
	if (plen - off < 8)
		pos = plen - 8;
	if (bpf_skb_load_bytes(skb, pos, b, 8))
		return -1;
	__u64 w = ((__u64)b[0] << 56) | ((__u64)b[1] << 48) | ((__u64)b[2] << 40) |
		  ((__u64)b[3] << 32) | ((__u64)b[4] << 24) | ((__u64)b[5] << 16) |
		  ((__u64)b[6] << 8) | b[7];
	__u32 shift = (off - pos) & 7;		/* bytes before off in the loaded word */
	*out = w << (8 * shift);
	return 0;
}

/* Decode the varint at off (it must end by end <= skb->len). 0 and *val, *size; -1 if
 * cut. Branch-free after the load, so the verifier follows one path per call. */
static __always_inline int quic_varint_load(struct __sk_buff *skb, __u32 off, __u32 end,
					    __u64 *val, __u32 *size)
{
	__u64 be = 0;
	if (off >= end)
		return -1;
	if (fr_load_be64(skb, off, skb->len, &be))
		return -1;
	__u32 n = quic_varint_size(be >> 56);
	if (n > end - off)
		return -1;
	__u32 bits = 8 * n;			/* 8..64 */
	__u64 v = be >> (64 - bits);		/* the varint's bytes */
	v &= (~0ull) >> (66 - bits);		/* without the two length bits */
	*val = v;
	*size = n;
	return 0;
}

/* Encode v as a varint of exactly `size` bytes (1, 2, 4, 8; non-minimal encodings are
 * legal, §16) into out[0..size). -1 if v does not fit. */
static __always_inline int quic_varint_store(__u64 v, __u32 size, __u8 *out)
{
	if (size == 1) {
		if (v >= (1ull << 6))
			return -1;
		out[0] = v;
	} else if (size == 2) {
		if (v >= (1ull << 14))
			return -1;
		out[0] = 0x40 | (v >> 8);
		out[1] = v;
	} else if (size == 4) {
		if (v >= (1ull << 30))
			return -1;
		out[0] = 0x80 | (v >> 24);
		out[1] = v >> 16;
		out[2] = v >> 8;
		out[3] = v;
	} else if (size == 8) {
		if (v >= (1ull << 62))
			return -1;
		out[0] = 0xc0 | (v >> 56);
		out[1] = v >> 48;
		out[2] = v >> 40;
		out[3] = v >> 32;
		out[4] = v >> 24;
		out[5] = v >> 16;
		out[6] = v >> 8;
		out[7] = v;
	} else {
		return -1;
	}
	return 0;
}

/* Bytes needed to send packet number full_pn when the peer acknowledged largest_acked
 * (FR_PN_NONE: nothing yet), RFC 9000 §17.1 and Appendix A.2: enough bits for twice
 * the number of unacknowledged packets. 1..4, or 5 if four bytes are not enough. */
static __always_inline __u32 quic_pn_len_needed(__u64 full_pn, __u64 largest_acked)
{
	__u64 unacked = largest_acked == 0xFFFFFFFFFFFFFFFFull ? full_pn + 1 : full_pn - largest_acked;
	/* min_bits = log2(unacked) + 1, then one more bit: 2 * unacked must be representable */
	if (unacked < (1ull << 7))
		return 1;
	if (unacked < (1ull << 15))
		return 2;
	if (unacked < (1ull << 23))
		return 3;
	if (unacked < (1ull << 31))
		return 4;
	return 5;
}

/* 1 if x != 0, else 0, without a branch (x < 2^63). */
static __always_inline __u64 quic_nonzero(__u64 x)
{
	__u64 y = x | (0 - x);
	asm volatile("" : "+r"(y));		/* no select back from clang */
	return y >> 63;
}

/* quic_pn_len_needed without branches: the verifier carries one state (1..5) on. */
static __always_inline __u32 quic_pn_len_needed_flat(__u64 full_pn, __u64 largest_acked)
{
	__u64 unacked = largest_acked == 0xFFFFFFFFFFFFFFFFull ? full_pn + 1 : full_pn - largest_acked;
	unacked &= (1ull << 62) - 1;		/* real counts are far below: keeps the sign bit clear */
	return 1 + quic_nonzero(unacked >> 7) + quic_nonzero(unacked >> 15) +
	       quic_nonzero(unacked >> 23) + quic_nonzero(unacked >> 31);
}

/* Big-endian truncated packet number: the low pn_len bytes of full_pn. */
static __always_inline void quic_pn_store(__u64 full_pn, __u32 pn_len, __u8 *out)
{
	if (pn_len == 1) {
		out[0] = full_pn;
	} else if (pn_len == 2) {
		out[0] = full_pn >> 8;
		out[1] = full_pn;
	} else if (pn_len == 3) {
		out[0] = full_pn >> 16;
		out[1] = full_pn >> 8;
		out[2] = full_pn;
	} else {
		out[0] = full_pn >> 24;
		out[1] = full_pn >> 16;
		out[2] = full_pn >> 8;
		out[3] = full_pn;
	}
}

/* Packed descriptions of the frames quic_frame_parse handles generically (RFC 9000 §19),
 * bit or 2-bit field per type 0x00..0x1f:
 *   KNOWN  1 bit   the type is handled here
 *   NVAR   2 bits  varints after the type
 *   LEN    1 bit   the last varint is the length of data that follows
 *   FIXED  2 bits  fixed bytes after that, in units of 8 */
#define QG_BIT(t) (1ull << (t))
#define QG_2(t, v) ((__u64)(v) << (2 * (t)))
#define QUIC_GENERIC_KNOWN                                                                 \
	(QG_BIT(0x01) | QG_BIT(0x04) | QG_BIT(0x05) | QG_BIT(0x06) | QG_BIT(0x07) |          \
	 QG_BIT(0x10) | QG_BIT(0x11) | QG_BIT(0x12) | QG_BIT(0x13) | QG_BIT(0x14) |          \
	 QG_BIT(0x15) | QG_BIT(0x16) | QG_BIT(0x17) | QG_BIT(0x18) | QG_BIT(0x19) |          \
	 QG_BIT(0x1a) | QG_BIT(0x1b) | QG_BIT(0x1c) | QG_BIT(0x1d) | QG_BIT(0x1e))
#define QUIC_GENERIC_NVAR                                                                  \
	(QG_2(0x04, 3) /* RESET_STREAM: id, error, final size */ |                          \
	 QG_2(0x05, 2) /* STOP_SENDING: id, error */ |                                      \
	 QG_2(0x06, 2) /* CRYPTO: offset, length */ |                                       \
	 QG_2(0x07, 1) /* NEW_TOKEN: length */ |                                            \
	 QG_2(0x10, 1) /* MAX_DATA */ | QG_2(0x11, 2) /* MAX_STREAM_DATA */ |               \
	 QG_2(0x12, 1) | QG_2(0x13, 1) /* MAX_STREAMS */ | QG_2(0x14, 1) /* DATA_BLOCKED */ | \
	 QG_2(0x15, 2) /* STREAM_DATA_BLOCKED */ | QG_2(0x16, 1) | QG_2(0x17, 1) |          \
	 QG_2(0x18, 2) /* NEW_CONNECTION_ID: sequence, retire prior to */ |                \
	 QG_2(0x19, 1) /* RETIRE_CONNECTION_ID */ |                                         \
	 QG_2(0x1c, 3) /* CONNECTION_CLOSE: error, frame type, reason length */ |           \
	 QG_2(0x1d, 2) /* CONNECTION_CLOSE (application): error, reason length */)
#define QUIC_GENERIC_LEN (QG_BIT(0x06) | QG_BIT(0x07) | QG_BIT(0x1c) | QG_BIT(0x1d))
#define QUIC_GENERIC_FIXED                                                                 \
	(QG_2(0x18, 2) /* stateless reset token */ | QG_2(0x1a, 1) | QG_2(0x1b, 1) /* PATH_* data */)

/* One frame as the walker found it. */
struct quic_frame {
	__u32 start;			/* offset of the type byte */
	__u32 end;			/* offset after the frame */
	__u8 type;
	__u8 fin;			/* STREAM: FIN bit */
	__u8 sid_size;			/* STREAM: bytes of the stream-id varint */
	__u8 _pad;
	__u32 sid_off;			/* STREAM: offset of the stream-id varint */
	__u32 data_off;			/* STREAM, DATAGRAM: first data byte */
	__u32 data_len;
	__u64 sid;			/* STREAM */
	__u64 offset;			/* STREAM: stream offset of data_off */
};

#define QUIC_WALK_OK 0
#define QUIC_WALK_UNKNOWN 1		/* a frame type the walker does not know */
#define QUIC_WALK_BAD 2			/* a frame runs past end */

/* Parse the frame at off (frames end at end) into *f. QUIC_WALK_*. */
static __always_inline int quic_frame_parse(struct __sk_buff *skb, __u32 off, __u32 end,
					    struct quic_frame *f)
{
	__u8 t;
	__u64 v = 0;
	__u32 n = 0;

	if (off >= end)
		return QUIC_WALK_BAD;
	if (bpf_skb_load_bytes(skb, off, &t, 1))
		return QUIC_WALK_BAD;
	f->start = off;
	f->type = t;
	off += 1;

	if (t == QUIC_FRAME_PADDING) {
		/* One PADDING byte per frame, or eight at once when the next eight bytes are
		 * zero too: stacks pad with a few bytes (aioquic at the end, quic-go at the
		 * start), so a long run exhausting MAX_FRAMES is left to userspace. */
		__u64 w = 1;
		if (off + 8 <= end && !bpf_skb_load_bytes(skb, off, &w, 8) && w == 0)
			off += 8;
		f->end = off;
		return QUIC_WALK_OK;
	}

	if (t >= QUIC_FRAME_STREAM && t <= QUIC_FRAME_STREAM_MAX) {
		f->fin = t & QUIC_STREAM_BIT_FIN;
		f->sid_off = off;
		if (quic_varint_load(skb, off, end, &v, &n))
			return QUIC_WALK_BAD;
		f->sid = v;
		f->sid_size = n;
		off += n;
		f->offset = 0;
		if (t & QUIC_STREAM_BIT_OFF) {
			if (quic_varint_load(skb, off, end, &v, &n))
				return QUIC_WALK_BAD;
			f->offset = v;
			off += n;
		}
		if (t & QUIC_STREAM_BIT_LEN) {
			if (quic_varint_load(skb, off, end, &v, &n))
				return QUIC_WALK_BAD;
			off += n;
			if (v > end - off)
				return QUIC_WALK_BAD;
		} else {
			v = end - off;
		}
		f->data_off = off;
		f->data_len = v;
		f->end = off + v;
		return QUIC_WALK_OK;
	}

	if (t == QUIC_FRAME_DATAGRAM || t == QUIC_FRAME_DATAGRAM_LEN) {
		v = end - off;
		if (t == QUIC_FRAME_DATAGRAM_LEN) {
			if (quic_varint_load(skb, off, end, &v, &n))
				return QUIC_WALK_BAD;
			off += n;
			if (v > end - off)
				return QUIC_WALK_BAD;
		}
		f->data_off = off;
		f->data_len = v;
		f->end = off + v;
		return QUIC_WALK_OK;
	}

	if (t == QUIC_FRAME_ACK || t == QUIC_FRAME_ACK_ECN) {
		__u64 count = 0;
		/* Largest Acknowledged, ACK Delay, ACK Range Count, First ACK Range */
#pragma clang loop unroll(disable)
		for (int k = 0; k < 4; k++) {
			if (quic_varint_load(skb, off, end, &v, &n))
				return QUIC_WALK_BAD;
			if (k == 2)
				count = v;
			off += n;
		}
		if (count > MAX_ACK_RANGES)
			return QUIC_WALK_UNKNOWN;
		__u32 extra = count * 2 + (t == QUIC_FRAME_ACK_ECN ? 3 : 0);
		/* Gap/length pairs and ECN counts: only their sizes matter. */
#pragma clang loop unroll(disable)
		for (int k = 0; k < MAX_ACK_RANGES * 2 + 3; k++) {
			__u8 b;
			if (k >= extra)
				break;
			if (off >= end || bpf_skb_load_bytes(skb, off, &b, 1))
				return QUIC_WALK_BAD;
			n = quic_varint_size(b);
			if (n > end - off)
				return QUIC_WALK_BAD;
			off += n;
		}
		f->end = off;
		return QUIC_WALK_OK;
	}

	/* The rest (types 0x01, 0x04..0x07, 0x10..0x1e): a few varints, optionally data
	 * whose length is the last varint, optionally fixed bytes. Described by packed
	 * tables indexed by type, so the verifier sees one path, not one per type. */
	if (t >= 0x20)
		return QUIC_WALK_UNKNOWN;
	if (!((QUIC_GENERIC_KNOWN >> t) & 1))
		return QUIC_WALK_UNKNOWN;
	__u32 nvar = (QUIC_GENERIC_NVAR >> (2 * t)) & 3;
	__u32 last_is_len = (QUIC_GENERIC_LEN >> t) & 1;
	__u32 fixed = ((QUIC_GENERIC_FIXED >> (2 * t)) & 3) * 8;
	/* Three steps written out: as a loop, clang folds the bound into nvar and the
	 * verifier can no longer see it end. */
	if (nvar > 0) {
		if (quic_varint_load(skb, off, end, &v, &n))
			return QUIC_WALK_BAD;
		off += n;
	}
	if (nvar > 1) {
		if (quic_varint_load(skb, off, end, &v, &n))
			return QUIC_WALK_BAD;
		off += n;
	}
	if (nvar > 2) {
		if (quic_varint_load(skb, off, end, &v, &n))
			return QUIC_WALK_BAD;
		off += n;
	}
	if (last_is_len) {
		if (v > end - off)
			return QUIC_WALK_BAD;
		off += v;
	}
	if (t == QUIC_FRAME_NEW_CONNECTION_ID) {
		/* sequence, retire prior to; then a length byte, the CID, a 16-byte token */
		__u8 l;
		if (off >= end || bpf_skb_load_bytes(skb, off, &l, 1))
			return QUIC_WALK_BAD;
		if (l < 1 || l > QUIC_MAX_CID_LEN)
			return QUIC_WALK_BAD;
		off += 1 + l;
	}
	if (off > end || fixed > end - off)
		return QUIC_WALK_BAD;
	off += fixed;
	f->end = off;
	return QUIC_WALK_OK;
}

#endif /* FASTRELAY_QUIC_H */
