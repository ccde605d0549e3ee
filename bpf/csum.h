/* csum.h: packet writes that keep the IPv4 header and UDP checksums right.
 *
 * All writes go through bpf_skb_store_bytes and the bpf_l3/l4_csum_replace helpers,
 * which handle CHECKSUM_PARTIAL (veth with TX offload: only pseudo-header changes
 * matter) and full checksums alike; BPF_F_MARK_MANGLED_0 leaves an IPv4 UDP checksum of
 * 0 ("none") alone and never produces 0. These helpers (and bpf_skb_adjust_room,
 * bpf_skb_change_tail) invalidate packet pointers; the programs use bpf_skb_load_bytes
 * only, so there is nothing to revalidate.
 *
 * Payload writes compute the old and new bytes' 16-bit ones' complement sums in
 * registers and hand them to bpf_l4_csum_replace: the UDP header starts at an even
 * offset (14 + 20 or 14 + 40), so the parity of a frame offset is its checksum parity.
 */
#ifndef FASTRELAY_CSUM_H
#define FASTRELAY_CSUM_H

#include <uapi/linux/bpf.h>

#include "consts.h"
#include "quic.h"

/* Longest single payload write (a 20-byte CID fits). */
#define FR_CSUM_MAX_WRITE 24

/* Replace one 4-byte word of an address covered by the IPv4 header checksum (l3_csum_off
 * >= 0) and the UDP pseudo-header. old/new are as on the wire. */
static __always_inline int fr_csum_addr_word(struct __sk_buff *skb, __u32 off, int l3_csum_off,
					     __u32 l4_csum_off, __u32 old, __u32 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off, old, new,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4))
		return -1;
	if (l3_csum_off >= 0 && bpf_l3_csum_replace(skb, l3_csum_off, old, new, 4))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 4, 0) ? -1 : 0;
}

/* Replace a UDP port (NBO), fixing the UDP checksum. */
static __always_inline int fr_csum_port(struct __sk_buff *skb, __u32 off, __u32 l4_csum_off,
					__u16 old, __u16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off, old, new, BPF_F_MARK_MANGLED_0 | 2))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 2, 0) ? -1 : 0;
}

/* The first n (0..8) bytes of a big-endian word, the rest zero. */
static __always_inline __u64 fr_be_head(__u64 w, __u32 n)
{
	if (n >= 8)
		return w;
	if (n == 0)
		return 0;
	return w & ~((~0ull) >> (8 * n));
}

/* Ones' complement sum of the four 16-bit words of a big-endian u64, unfolded. */
static __always_inline __u64 fr_sum16x4(__u64 w)
{
	return (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
}

static __always_inline __u16 fr_fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

/* Checksum contribution (folded, host order) of bytes w0|w1|w2 (big-endian words, bytes
 * past len already zero) placed at packet offset off: an odd offset swaps the bytes of
 * the sum (RFC 1071, byte-order independence). */
static __always_inline __u16 fr_csum_words(__u64 w0, __u64 w1, __u64 w2, __u32 off)
{
	__u16 s = fr_fold(fr_sum16x4(w0) + fr_sum16x4(w1) + fr_sum16x4(w2));
	if (off & 1)
		s = (s >> 8) | (s << 8);
	return s;
}

static __always_inline __u64 fr_be64_of(const __u8 *b)
{
	return ((__u64)b[0] << 56) | ((__u64)b[1] << 48) | ((__u64)b[2] << 40) |
	       ((__u64)b[3] << 32) | ((__u64)b[4] << 24) | ((__u64)b[5] << 16) |
	       ((__u64)b[6] << 8) | b[7];
}

/* Write len (1..FR_CSUM_MAX_WRITE) bytes of buf (a FR_CSUM_MAX_WRITE-byte buffer) at off
 * inside the UDP payload and fold the difference into the UDP checksum. 0 or -1. */
static __always_inline int fr_csum_write(struct __sk_buff *skb, __u32 l4_csum_off, __u32 off,
					 __u8 *buf, __u32 len)
{
	__u64 o0 = 0, o1 = 0, o2 = 0;
	__u32 plen = skb->len;

	if (len < 1 || len > FR_CSUM_MAX_WRITE || off >= plen || len > plen - off)
		return -1;
	if (fr_load_be64(skb, off, plen, &o0))
		return -1;
	if (len > 8 && fr_load_be64(skb, off + 8, plen, &o1))
		return -1;
	if (len > 16 && fr_load_be64(skb, off + 16, plen, &o2))
		return -1;
	__u32 n1 = len > 8 ? len - 8 : 0, n2 = len > 16 ? len - 16 : 0;
	__u16 old = fr_csum_words(fr_be_head(o0, len), fr_be_head(o1, n1), fr_be_head(o2, n2), off);
	__u16 new = fr_csum_words(fr_be_head(fr_be64_of(buf), len), fr_be_head(fr_be64_of(buf + 8), n1),
				  fr_be_head(fr_be64_of(buf + 16), n2), off);

	__u64 slen = len;
	fr_barrier_var(slen);
	if (slen < 1 || slen > FR_CSUM_MAX_WRITE)
		return -1;
	if (bpf_skb_store_bytes(skb, off, buf, slen, 0))
		return -1;
	if (old != new &&
	    bpf_l4_csum_replace(skb, l4_csum_off, bpf_htons(old), bpf_htons(new),
				BPF_F_MARK_MANGLED_0 | 2))
		return -1;
	return 0;
}

/* Mask of the first c bytes of a big-endian word, c clamped to 0..8, without a branch
 * (the callers' loops stay one verifier path). */
static __always_inline __u64 fr_head_mask(__s64 c)
{
	/* The sign masks go through a barrier: clang would turn max/min back into selects,
	 * which are branches in BPF. */
	__s64 neg = c >> 63;
	fr_barrier_var(neg);
	c &= ~neg;				/* max(c, 0) */
	__s64 d = c - 8;
	__s64 dneg = d >> 63;
	fr_barrier_var(dneg);
	c = 8 + (d & dneg);			/* min(c, 8) */
	__u64 bits = 8 * c, half = bits / 2;	/* two shifts: never one of 64 */
	return ~((~0ull >> half) >> (bits - half));
}

/* Ones' complement sum (folded, host order) of len (0..32) bytes at b, placed at a frame
 * offset of parity odd. b must have 32 readable bytes (a map value: 8-byte loads at any
 * alignment). Branch-free. */
static __always_inline __u16 fr_csum_bytes32(const __u8 *b, __u32 len, __u32 odd)
{
	__s64 n = len;
	__u64 s = 0;
#pragma clang loop unroll(disable)
	for (int j = 0; j < 4; j++)
		s += fr_sum16x4(__builtin_bswap64(*(const __u64 *)(b + 8 * j)) & fr_head_mask(n - 8 * j));
	__u64 f = fr_fold(s);
	__u64 sw = ((f >> 8) | (f << 8)) & 0xffff;
	return f ^ ((f ^ sw) & (0 - (__u64)(odd & 1)));
}

/* 1 when the UDP checksum of skb is CHECKSUM_PARTIAL (the field holds the pseudo-header
 * sum only and the device sums from csum_start), 0 when the field is the whole checksum,
 * -1 on error. No __sk_buff field says it: a data-only change made through
 * bpf_l4_csum_replace (by diff, without BPF_F_PSEUDO_HDR) is skipped for CHECKSUM_PARTIAL
 * alone, so apply one, look, and put the field back. */
static __always_inline int fr_csum_is_partial(struct __sk_buff *skb, __u32 l4_csum_off)
{
	__u16 c0 = 0, c1 = 0;
	if (bpf_skb_load_bytes(skb, l4_csum_off, &c0, 2))
		return -1;
	if (bpf_l4_csum_replace(skb, l4_csum_off, 0, 1, 0))
		return -1;
	if (bpf_skb_load_bytes(skb, l4_csum_off, &c1, 2))
		return -1;
	if (c1 == c0)
		return 1;
	return bpf_skb_store_bytes(skb, l4_csum_off, &c0, 2, 0) ? -1 : 0;
}

/* Bytes fr_csum_zero overwrites at most (one PADDED frame). */
#define FR_MAX_ZERO_BLOCKS 24		/* 64-byte blocks: 1536 bytes */

/* Overwrite [off, end) of the UDP payload with zero bytes (PADDING frames) and take
 * their sum out of the UDP checksum: 64-byte stores (one helper call each), then 8-byte
 * and single-store tails. 0, or -1 if the range is longer than FR_MAX_ZERO_BLOCKS
 * blocks or runs past the packet. */
static __always_inline int fr_csum_zero(struct __sk_buff *skb, __u32 l4_csum_off, __u32 off,
					__u32 end)
{
	__u64 zero[8] = {};
	__u64 sum = 0, w = 0;
	__u32 plen = skb->len, start = off;
	if (off >= end)
		return 0;
	if (end > plen || end - off > FR_MAX_ZERO_BLOCKS * 64 + 63)
		return -1;
#pragma clang loop unroll(disable)
	for (int k = 0; k < FR_MAX_ZERO_BLOCKS; k++) {
		if (end - off < 64)
			break;
		__u64 b[8];
		if (bpf_skb_load_bytes(skb, off, b, 64))
			return -1;
		/* words as loaded (little-endian host): byte-swapped sums, swapped back below */
		sum += fr_sum16x4(b[0]) + fr_sum16x4(b[1]) + fr_sum16x4(b[2]) + fr_sum16x4(b[3]) +
		       fr_sum16x4(b[4]) + fr_sum16x4(b[5]) + fr_sum16x4(b[6]) + fr_sum16x4(b[7]);
		if (bpf_skb_store_bytes(skb, off, zero, 64, 0))
			return -1;
		off += 64;
	}
	/* sum so far is over little-endian words: fold and swap to big-endian order */
	__u16 le = fr_fold(sum);
	sum = (__u16)((le >> 8) | (le << 8));
#pragma clang loop unroll(disable)
	for (int k = 0; k < 7; k++) {
		if (end - off < 8)
			break;
		if (fr_load_be64(skb, off, plen, &w))
			return -1;
		sum += fr_sum16x4(w);
		if (bpf_skb_store_bytes(skb, off, zero, 8, 0))
			return -1;
		off += 8;
	}
	__u64 r = end - off;
	fr_barrier_var(r);
	if (r > 7)
		return -1;
	if (r) {
		if (fr_load_be64(skb, off, plen, &w))
			return -1;
		sum += fr_sum16x4(fr_be_head(w, r));
		if (bpf_skb_store_bytes(skb, off, zero, r, 0))
			return -1;
	}
	__u16 old = fr_fold(sum);
	if (start & 1)
		old = (old >> 8) | (old << 8);
	if (old && bpf_l4_csum_replace(skb, l4_csum_off, bpf_htons(old), 0, BPF_F_MARK_MANGLED_0 | 2))
		return -1;
	return 0;
}

#endif /* FASTRELAY_CSUM_H */
