/* quic_protect.h: QUIC v1 short-header (1-RTT) packet protection on an skb, in place,
 * with TLS_CHACHA20_POLY1305_SHA256 (RFC 9001 §5.3 AEAD, §5.4 header protection).
 *
 * A packet never changes length: on egress the plaintext layout's 16-byte tag slot
 * receives the tag; on ingress the verified tag is replaced by the caller's token.
 * The UDP checksum is fixed incrementally over the bytes that changed (the pseudo-header
 * is unchanged); a CHECKSUM_PARTIAL skb keeps its pseudo-header sum (the helper knows).
 *
 * Helpers used here that invalidate packet pointers: bpf_skb_store_bytes,
 * bpf_l4_csum_replace. Nothing here uses direct packet access.
 */
#ifndef FASTRELAY_QUIC_PROTECT_H
#define FASTRELAY_QUIC_PROTECT_H

#include "chacha20poly1305.h"
#include "shim_structs.h"

/* Results: 0 done, negative = why not (the caller counts and decides). */
#define QP_OK 0
#define QP_TOO_SHORT (-1)	/* cannot be sampled (RFC 9001 §5.4.2) */
#define QP_TOO_LONG (-2)	/* payload longer than CP_MAX_DATA */
#define QP_BAD_TAG (-3)
#define QP_NO_PHASE (-4)	/* no keys for the packet's key phase */
#define QP_ERROR (-5)		/* a helper failed or the connection entry is malformed */

#define QP_SAMPLE_OFFSET 4	/* the sample starts 4 bytes after the PN's start */
#define QP_SAMPLE_LEN 16
#define QP_PN_MAX (1ULL << 62)

/* Where the short-header packet sits in the skb. */
struct qp_packet {
	__u64 off;		/* offset of the packet's first byte */
	__u64 len;		/* bytes to the end of the UDP payload */
	__u64 csum_off;		/* offset of the UDP checksum field */
	__u64 odd;		/* 1 when off - UDP header offset is odd */
	__u64 key_phase;	/* out, after QP_OK: the packet's key phase bit */
	__u64 previous;		/* out, after qp_unprotect's QP_OK: 1 when the previous phase's
				 * keys verified it (RFC 9001 §6.5) */
};

/* Pin a bound-checked value so LLVM does not use an unchecked copy of it. */
#define QP_PIN(v) asm volatile("" : "+r"(v))

/* Pass a value through map memory, which the verifier does not track: every path that
 * reaches the expensive crypto part (each PN length, each coalesced-packet walk) then
 * arrives with the same state after the same bounds checks, so the verifier prunes it
 * instead of walking the crypto once per path. */
#define QP_OPAQUE(s, i, v)                                     \
	do {                                                   \
		((volatile __u64 *)(s)->vars)[i] = (v);        \
		(v) = ((volatile __u64 *)(s)->vars)[i];        \
	} while (0)

static __always_inline __u64 qp_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

static __always_inline __u64 qp_swap16(__u64 s)
{
	return ((s & 0xff) << 8) | (s >> 8);
}

/* bpf_csum_diff handles at most this many bytes per call (its scratch area). */
#define QP_CSUM_CHUNK 512

/**
 * qp_csum_data - one's-complement sum (folded, memory order) of @len bytes of @buf.
 * NOTE: zeroes the (up to 3) bytes after @len in @buf to pad it to 4-byte words.
 *
 * The kernel's csum_partial (through bpf_csum_diff) instead of a loop: a loop's sum
 * grows with every iteration, and the verifier would see a different state at each
 * exit; a helper's result is one unknown scalar on every path.
 */
static __always_inline __u64 qp_csum_data(__u8 *buf, __u64 len)
{
	__u64 n = (len + 3) & ~3ULL, sum;

	CP_OPAQUE(n);	/* branches on n must not narrow the caller's len */
	if (n > 3 * QP_CSUM_CHUNK || n < 4)
		return 0;
	*(__u32 *)(buf + len) = 0;
	if (n <= QP_CSUM_CHUNK)
		return qp_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)buf, n, 0));
	sum = (__u32)bpf_csum_diff(0, 0, (__be32 *)buf, QP_CSUM_CHUNK, 0);
	if (n <= 2 * QP_CSUM_CHUNK)
		return qp_fold(sum + (__u32)bpf_csum_diff(0, 0, (__be32 *)(buf + QP_CSUM_CHUNK),
							  n - QP_CSUM_CHUNK, 0));
	sum += (__u32)bpf_csum_diff(0, 0, (__be32 *)(buf + QP_CSUM_CHUNK), QP_CSUM_CHUNK, 0);
	return qp_fold(sum + (__u32)bpf_csum_diff(0, 0, (__be32 *)(buf + 2 * QP_CSUM_CHUNK),
						  n - 2 * QP_CSUM_CHUNK, 0));
}

/* One's-complement sum of the 32-byte header buffer (zero past the header). */
static __always_inline __u64 qp_csum_hdr(const __u8 *hdr)
{
	const __u64 *w = (const __u64 *)hdr;
	__u64 sum = 0;

	CP_BARRIER();	/* the header was just written through other types */
	sum += (w[0] & 0xffffffff) + (w[0] >> 32);
	sum += (w[1] & 0xffffffff) + (w[1] >> 32);
	sum += (w[2] & 0xffffffff) + (w[2] >> 32);
	sum += (w[3] & 0xffffffff) + (w[3] >> 32);
	return qp_fold(sum);
}

/* Sum of a region starting @odd bytes off the checksum's 16-bit alignment. */
static __always_inline __u64 qp_align(__u64 sum, __u64 odd)
{
	return odd ? qp_swap16(sum) : sum;
}

/* RFC 9000 Appendix A.3: the full packet number closest to @expected. */
static __always_inline __u64 qp_decode_pn(__u64 expected, __u64 truncated, __u64 pn_len)
{
	__u64 win = 1ULL << (pn_len * 8);
	__u64 hwin = win / 2;
	__u64 candidate = (expected & ~(win - 1)) | truncated;

	if (candidate + hwin <= expected && candidate < QP_PN_MAX - win)
		return candidate + win;
	if (candidate > expected + hwin && candidate >= win)
		return candidate - win;
	return candidate;
}

/* The AEAD nonce (RFC 9001 §5.3): IV XOR the packet number, left-padded to 12 bytes. */
static __always_inline void qp_nonce(const struct shim_phase_keys *ph, __u64 pn, __u32 *n0,
				     __u32 *n1, __u32 *n2)
{
	const __u32 *iv = (const __u32 *)ph->iv;

	*n0 = iv[0];
	*n1 = iv[1] ^ __builtin_bswap32((__u32)(pn >> 32));
	*n2 = iv[2] ^ __builtin_bswap32((__u32)pn);
}

static __always_inline void qp_zero_hdr(struct cp_scratch *s)
{
	__u64 *w = (__u64 *)s->hdr;

	w[0] = 0;
	w[1] = 0;
	w[2] = 0;
	w[3] = 0;
}

static __always_inline void qp_fix_csum(struct __sk_buff *skb, const struct qp_packet *pkt,
					__u64 old_sum, __u64 new_sum)
{
	old_sum = qp_fold(old_sum);
	new_sum = qp_fold(new_sum);
	bpf_l4_csum_replace(skb, pkt->csum_off, old_sum, new_sum, BPF_F_MARK_MANGLED_0 | 2);
}

/**
 * qp_recv_slot - which of conn->phase[] opens a received packet of key-phase bit @bit and
 * packet number @pn (RFC 9001 §6.5): the current phase's for its bit; for the other bit
 * the previous phase's when the connection holds them and @pn is lower than the first
 * number received in the current phase (or none was received yet), else the next
 * phase's. Old keys never open a packet numbered at or above the current phase's first,
 * so a packet the peer sent after it updated can only verify with newer keys.
 */
static __always_inline __u64 qp_recv_slot(const struct shim_conn *conn, __u64 bit, __u64 pn)
{
	__u64 cur = conn->current_phase & 1, since;

	if (bit == cur || !conn->phase[SHIM_PHASE_PREVIOUS].valid)
		return bit;
	since = conn->phase_first_pn[cur];
	if (!since || pn + 1 < since)
		return SHIM_PHASE_PREVIOUS;
	return bit;
}

/**
 * qp_unprotect - remove header protection, verify and decrypt a short-header packet,
 * write @token into its tag slot and fix the UDP checksum (RFC 9001 §5.3, §5.4).
 * Keys: qp_recv_slot.
 * NOTE: on any error the skb is unchanged. Updates conn->next_pn and the first packet
 * number of the phase whose keys verified it (conn->phase_first_pn) after the tag verified.
 * Returns QP_OK or a negative QP_*.
 */
static __always_inline int qp_unprotect(struct __sk_buff *skb, struct qp_packet *pkt,
					struct shim_conn *conn, struct cp_scratch *s,
					const __u8 *token)
{
	__u64 dcid_len = conn->dcid_len, pn_off, len = pkt->len, hdr_len, data_len, ct_len;
	__u64 mask, pn_len, keep, truncated, pn, old_sum, new_sum, first, off = pkt->off;
	__u64 odd = pkt->odd, slot;
	__u32 pnw, n0, n1, n2;
	struct shim_phase_keys *ph;

	if (dcid_len > SHIM_MAX_CID_LEN)
		return QP_ERROR;
	QP_PIN(dcid_len);
	pn_off = 1 + dcid_len;
	if (len < pn_off + QP_SAMPLE_OFFSET + QP_SAMPLE_LEN)
		return QP_TOO_SHORT;

	if (bpf_skb_load_bytes(skb, pkt->off + pn_off + QP_SAMPLE_OFFSET, s->sample, QP_SAMPLE_LEN))
		return QP_ERROR;
	mask = cp_hp_mask(s, (const __u32 *)conn->hp_key);

	qp_zero_hdr(s);
	if (bpf_skb_load_bytes(skb, pkt->off, s->hdr, pn_off + QP_SAMPLE_OFFSET))
		return QP_ERROR;
	first = s->hdr[0] ^ (mask & 0x1f);
	pn_len = (first & 0x03) + 1;
	hdr_len = pn_off + pn_len;
	keep = (1ULL << (pn_len * 8)) - 1;
	data_len = len - hdr_len;
	if (data_len > CP_MAX_DATA)
		return QP_TOO_LONG;
	if (data_len < CP_TAG_LEN)
		return QP_TOO_SHORT;
	QP_PIN(data_len);
	ct_len = data_len - CP_TAG_LEN;

	/* Header: old bytes (protected), then unprotected; zero past the header either way. */
	pnw = *(__u32 *)(s->hdr + pn_off);
	*(__u32 *)(s->hdr + pn_off) = pnw & keep;
	old_sum = qp_align(qp_csum_hdr(s->hdr), pkt->odd);
	pnw = (pnw ^ (__u32)(mask >> 8)) & keep;
	*(__u32 *)(s->hdr + pn_off) = pnw;
	s->hdr[0] = first;
	new_sum = qp_align(qp_csum_hdr(s->hdr), pkt->odd);
	truncated = __builtin_bswap32(pnw) >> (32 - pn_len * 8);
	pn = qp_decode_pn(conn->next_pn, truncated, pn_len);

	slot = qp_recv_slot(conn, (first >> 2) & 1, pn);
	if (slot > SHIM_PHASE_PREVIOUS || !conn->phase[slot].valid)
		return QP_NO_PHASE;
	pkt->key_phase = (first >> 2) & 1;

	QP_OPAQUE(s, 0, hdr_len);
	QP_OPAQUE(s, 1, data_len);
	QP_OPAQUE(s, 2, old_sum);
	QP_OPAQUE(s, 3, new_sum);
	QP_OPAQUE(s, 4, off);
	QP_OPAQUE(s, 5, odd);
	QP_OPAQUE(s, 6, pn);
	QP_OPAQUE(s, 7, slot);	/* the three key choices reach the crypto in one state */
	if (hdr_len < 2 || hdr_len > 32 || data_len > CP_MAX_DATA || data_len < CP_TAG_LEN ||
	    slot > SHIM_PHASE_PREVIOUS)
		return QP_ERROR;
	QP_PIN(hdr_len);
	QP_PIN(data_len);
	QP_PIN(slot);
	ct_len = data_len - CP_TAG_LEN;
	ph = &conn->phase[slot];

	if (bpf_skb_load_bytes(skb, off + hdr_len, s->data, data_len))
		return QP_ERROR;
	*(__u64 *)s->tag = *(__u64 *)(s->data + ct_len);
	*(__u64 *)(s->tag + 8) = *(__u64 *)(s->data + ct_len + 8);
	old_sum += qp_align(qp_csum_data(s->data, data_len), odd ^ (hdr_len & 1));

	qp_nonce(ph, pn, &n0, &n1, &n2);
	if (cp_aead_open(s, (const __u32 *)ph->key, n0, n1, n2, hdr_len, ct_len))
		return QP_BAD_TAG;

	*(__u64 *)(s->data + ct_len) = *(const __u64 *)token;
	*(__u64 *)(s->data + ct_len + 8) = *(const __u64 *)(token + 8);
	new_sum += qp_align(qp_csum_data(s->data, data_len), odd ^ (hdr_len & 1));

	if (bpf_skb_store_bytes(skb, off, s->hdr, hdr_len, 0))
		return QP_ERROR;
	if (bpf_skb_store_bytes(skb, off + hdr_len, s->data, data_len, 0))
		return QP_ERROR;
	qp_fix_csum(skb, pkt, old_sum, new_sum);
	if (pn + 1 > conn->next_pn)
		conn->next_pn = pn + 1;
	pkt->previous = slot == SHIM_PHASE_PREVIOUS;
	if (slot < SHIM_PHASE_PREVIOUS) {
		QP_PIN(slot);
		if (!conn->phase_first_pn[slot] || pn + 1 < conn->phase_first_pn[slot])
			conn->phase_first_pn[slot] = pn + 1;
	}
	return QP_OK;
}

/**
 * qp_protect - encrypt a plaintext-layout short-header packet (payload, then a 16-byte
 * tag slot), write the tag into the slot, apply header protection and fix the UDP
 * checksum. The full packet number is @exact_pn when @have_pn (the fast path renumbered
 * the packet and said which number it wrote; its truncation must be the header's, else
 * QP_ERROR), else recovered from conn->next_pn.
 * NOTE: on any error the skb is unchanged. Returns QP_OK or a negative QP_*.
 */
static __always_inline int qp_protect(struct __sk_buff *skb, struct qp_packet *pkt,
				      struct shim_conn *conn, struct cp_scratch *s,
				      __u64 exact_pn, int have_pn)
{
	__u64 dcid_len = conn->dcid_len, pn_off, len = pkt->len, hdr_len, data_len, ct_len;
	__u64 mask, pn_len, keep, truncated, pn, old_sum, new_sum, first, tag_lo, tag_hi, soff;
	__u64 off = pkt->off, odd = pkt->odd;
	__u32 pnw, n0, n1, n2;
	struct shim_phase_keys *ph;

	if (dcid_len > SHIM_MAX_CID_LEN)
		return QP_ERROR;
	QP_PIN(dcid_len);
	pn_off = 1 + dcid_len;
	if (len < pn_off + QP_SAMPLE_OFFSET + QP_SAMPLE_LEN)
		return QP_TOO_SHORT;

	qp_zero_hdr(s);
	if (bpf_skb_load_bytes(skb, pkt->off, s->hdr, pn_off + QP_SAMPLE_OFFSET))
		return QP_ERROR;
	first = s->hdr[0];
	pn_len = (first & 0x03) + 1;
	hdr_len = pn_off + pn_len;
	keep = (1ULL << (pn_len * 8)) - 1;
	data_len = len - hdr_len;
	if (data_len > CP_MAX_DATA)
		return QP_TOO_LONG;
	if (data_len < CP_TAG_LEN)
		return QP_TOO_SHORT;
	QP_PIN(data_len);
	ct_len = data_len - CP_TAG_LEN;

	pnw = *(__u32 *)(s->hdr + pn_off) & keep;
	*(__u32 *)(s->hdr + pn_off) = pnw;
	old_sum = qp_align(qp_csum_hdr(s->hdr), pkt->odd);
	truncated = __builtin_bswap32(pnw) >> (32 - pn_len * 8);
	if (have_pn) {
		if (exact_pn >= QP_PN_MAX || (exact_pn & keep) != truncated)
			return QP_ERROR;
		pn = exact_pn;
	} else {
		pn = qp_decode_pn(conn->next_pn, truncated, pn_len);
	}

	ph = &conn->phase[(first >> 2) & 1];
	if (!ph->valid)
		return QP_NO_PHASE;
	pkt->key_phase = (first >> 2) & 1;

	QP_OPAQUE(s, 0, hdr_len);
	QP_OPAQUE(s, 1, data_len);
	QP_OPAQUE(s, 2, old_sum);
	QP_OPAQUE(s, 3, pn_len);
	QP_OPAQUE(s, 4, off);
	QP_OPAQUE(s, 5, odd);
	QP_OPAQUE(s, 6, pn_off);
	QP_OPAQUE(s, 7, pn);
	if (hdr_len < 2 || hdr_len > 32 || data_len > CP_MAX_DATA || data_len < CP_TAG_LEN || pn_len > 4 || pn_len < 1 ||
	    pn_off > SHIM_MAX_CID_LEN + 1)
		return QP_ERROR;
	QP_PIN(hdr_len);
	QP_PIN(data_len);
	QP_PIN(pn_off);
	QP_PIN(pn_len);
	ct_len = data_len - CP_TAG_LEN;
	keep = (1ULL << (pn_len * 8)) - 1;

	if (bpf_skb_load_bytes(skb, off + hdr_len, s->data, data_len))
		return QP_ERROR;
	old_sum += qp_align(qp_csum_data(s->data, data_len), odd ^ (hdr_len & 1));

	qp_nonce(ph, pn, &n0, &n1, &n2);
	cp_aead_seal(s, (const __u32 *)ph->key, n0, n1, n2, hdr_len, ct_len, &tag_lo, &tag_hi);
	*(__u64 *)(s->data + ct_len) = tag_lo;
	*(__u64 *)(s->data + ct_len + 8) = tag_hi;
	new_sum = qp_align(qp_csum_data(s->data, data_len), odd ^ (hdr_len & 1));

	/* Header protection: the sample starts 4 bytes after the PN's start. */
	soff = QP_SAMPLE_OFFSET - pn_len;
	QP_PIN(soff);
	soff &= 3;
	*(__u64 *)s->sample = *(__u64 *)(s->data + soff);
	*(__u64 *)(s->sample + 8) = *(__u64 *)(s->data + soff + 8);
	mask = cp_hp_mask(s, (const __u32 *)conn->hp_key);
	s->hdr[0] = first ^ (mask & 0x1f);
	*(__u32 *)(s->hdr + pn_off) = (pnw ^ (__u32)(mask >> 8)) & keep;
	new_sum += qp_align(qp_csum_hdr(s->hdr), odd);

	if (bpf_skb_store_bytes(skb, off, s->hdr, hdr_len, 0))
		return QP_ERROR;
	if (bpf_skb_store_bytes(skb, off + hdr_len, s->data, data_len, 0))
		return QP_ERROR;
	qp_fix_csum(skb, pkt, old_sum, new_sum);
	if (pn + 1 > conn->next_pn)
		conn->next_pn = pn + 1;
	return QP_OK;
}

#endif /* FASTRELAY_QUIC_PROTECT_H */
