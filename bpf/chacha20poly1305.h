/* chacha20poly1305.h: ChaCha20 (RFC 8439 §2.3-2.4), Poly1305 (§2.5), the AEAD
 * construction (§2.8) and QUIC header protection with ChaCha20 (RFC 9001 §5.4.4), in
 * plain eBPF for bcc 0.26 (no kfuncs, no bpf_loop, no BPF-to-BPF calls).
 *
 * Verifier recipe (../shared/notes/toolchain.md §9, refined here): every function
 * inlined; loops bounded by a constant with unrolling disabled; each block loop's trip
 * count is computed before the loop and hidden from LLVM (CP_OPAQUE), the loop only
 * tests it at the top and holds no branch on data or on a partial block (a partial last
 * block is zero-padded in place before the loop), so every exit reaches the rest of the
 * program in the same verifier state and is pruned; u64 for every length and offset,
 * pinned after its bounds check; buffers live in a per-CPU map value (struct
 * cp_scratch), never on the stack; branches depend on lengths only, never on secret
 * bytes (constant time); a tag is compared as an OR of XORs.
 *
 * Buffers are little-endian u32/u64 words read in place: the host must be little-endian.
 */
#ifndef FASTRELAY_CHACHA20POLY1305_H
#define FASTRELAY_CHACHA20POLY1305_H

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "chacha20poly1305.h reads key and data words in place: little-endian hosts only"
#endif

/* Largest ciphertext (payload plus tag) one call handles, bytes: a 1500-byte MTU minus
 * IPv4 and UDP headers, minus the smallest short header (1 byte + 1-byte PN). */
#ifndef CP_MAX_DATA
#define CP_MAX_DATA 1472
#endif
#define CP_BLOCK 64
#define CP_MAX_BLOCKS ((CP_MAX_DATA + CP_BLOCK - 1) / CP_BLOCK)
#define CP_MAX_POLY_BLOCKS ((CP_MAX_DATA + 15) / 16)
/* The data buffer: whole keystream blocks plus room for the 16-byte tag loads past them. */
#define CP_DATA_BUF (CP_MAX_BLOCKS * CP_BLOCK + 64)
#define CP_TAG_LEN 16
#define CP_KEY_LEN 32
#define CP_NONCE_LEN 12

#define CP_MASK26 0x3ffffffULL

/* Hide a loop's trip count from LLVM: otherwise it rewrites `i >= blocks` into a test on
 * the caller's length, every iteration's exit then narrows that (precise) length
 * differently, and the verifier walks the rest of the program once per iteration. */
#define CP_OPAQUE(v) asm volatile("" : "+r"(v))

/* Buffers are written and read through different integer types (u8, u32, u64): a
 * compiler barrier after each write keeps strict aliasing from reordering them. */
#define CP_BARRIER() asm volatile("" ::: "memory")

/* Poly1305 accumulator and key in radix 2^26 (five limbs, products fit in u64). */
struct cp_poly {
	__u64 r0, r1, r2, r3, r4;
	__u64 s1, s2, s3, s4;	/* r1..r4 times 5 */
	__u64 h0, h1, h2, h3, h4;
	__u64 pad_lo, pad_hi;	/* s, the second half of the one-time key */
};

/* Per-CPU working memory of one packet (a map value: the 512-byte stack is too small). */
struct cp_scratch {
	__u32 block[16];		/* one ChaCha20 output block */
	struct cp_poly poly;
	__u8 hdr[32];			/* the QUIC header (AAD), zero past its length */
	__u8 sample[16];		/* header-protection sample */
	__u8 tag[CP_TAG_LEN];		/* the received tag */
	__u64 vars[8];			/* lengths passed through memory (see QP_OPAQUE) */
	__u8 data[CP_DATA_BUF];		/* payload (and tag slot) of the packet */
};


/* State words live in u64 registers with garbage above bit 31 (bcc emits no 32-bit
 * ALU): additions and XORs keep the low 32 bits right, and the rotation reads only them
 * (shifting left by 32 first drops the garbage), so nothing is masked inside a round. */
#define CP_ROTL(v, n) (((v) << (n)) | (((v) << 32) >> (64 - (n))))
#define CP_QR(a, b, c, d)                                      \
	do {                                                   \
		a += b; d ^= a; d = CP_ROTL(d, 16);            \
		c += d; b ^= c; b = CP_ROTL(b, 12);            \
		a += b; d ^= a; d = CP_ROTL(d, 8);             \
		c += d; b ^= c; b = CP_ROTL(b, 7);             \
	} while (0)

/**
 * cp_chacha20_block - one ChaCha20 block (RFC 8439 §2.3) into @out.
 * @key: eight little-endian key words
 * @counter: the block counter
 * @n0, @n1, @n2: the nonce as three little-endian words
 */
static __always_inline void cp_chacha20_block(const __u32 *key, __u32 counter, __u32 n0,
					      __u32 n1, __u32 n2, __u32 *out)
{
	__u64 x0 = 0x61707865, x1 = 0x3320646e, x2 = 0x79622d32, x3 = 0x6b206574;
	__u64 x4 = key[0], x5 = key[1], x6 = key[2], x7 = key[3];
	__u64 x8 = key[4], x9 = key[5], x10 = key[6], x11 = key[7];
	__u64 x12 = counter, x13 = n0, x14 = n1, x15 = n2;
	int i;

#pragma clang loop unroll(disable)
	for (i = 0; i < 10; i++) {
		CP_QR(x0, x4, x8, x12);
		CP_QR(x1, x5, x9, x13);
		CP_QR(x2, x6, x10, x14);
		CP_QR(x3, x7, x11, x15);
		CP_QR(x0, x5, x10, x15);
		CP_QR(x1, x6, x11, x12);
		CP_QR(x2, x7, x8, x13);
		CP_QR(x3, x4, x9, x14);
	}
	out[0] = x0 + 0x61707865;
	out[1] = x1 + 0x3320646e;
	out[2] = x2 + 0x79622d32;
	out[3] = x3 + 0x6b206574;
	out[4] = x4 + key[0];
	out[5] = x5 + key[1];
	out[6] = x6 + key[2];
	out[7] = x7 + key[3];
	out[8] = x8 + key[4];
	out[9] = x9 + key[5];
	out[10] = x10 + key[6];
	out[11] = x11 + key[7];
	out[12] = x12 + counter;
	out[13] = x13 + n0;
	out[14] = x14 + n1;
	out[15] = x15 + n2;
	CP_BARRIER();
}

/**
 * cp_chacha20_xor - XOR @len bytes of s->data with the ChaCha20 keystream from block
 * @counter on (RFC 8439 §2.4). Whole 64-byte blocks are XORed: bytes between @len and
 * the end of its last block are overwritten with garbage (never stored by callers).
 *
 * Verifier shape (for every loop here): the trip count is computed before the loop, the
 * loop only tests it at the top and never branches on data or on a partial block, so
 * every iteration's exit reaches the rest of the program in the same state.
 */
static __always_inline void cp_chacha20_xor(struct cp_scratch *s, const __u32 *key, __u32 counter,
					    __u32 n0, __u32 n1, __u32 n2, __u64 len)
{
	__u64 blocks = (len + CP_BLOCK - 1) / CP_BLOCK;
	__u32 i;

	CP_OPAQUE(blocks);

#pragma clang loop unroll(disable)
	for (i = 0; i < CP_MAX_BLOCKS; i++) {
		__u64 *d = (__u64 *)(s->data + (__u64)i * CP_BLOCK);
		__u64 *k = (__u64 *)s->block;

		if (i >= blocks)
			break;
		cp_chacha20_block(key, counter + i, n0, n1, n2, s->block);
		d[0] ^= k[0];
		d[1] ^= k[1];
		d[2] ^= k[2];
		d[3] ^= k[3];
		d[4] ^= k[4];
		d[5] ^= k[5];
		d[6] ^= k[6];
		d[7] ^= k[7];
	}
}

/* Poly1305 (RFC 8439 §2.5): one 16-byte block @lo|@hi plus 2^128, radix 2^26. */
static __always_inline void cp_poly_block(struct cp_poly *p, __u64 lo, __u64 hi)
{
	__u64 h0 = p->h0, h1 = p->h1, h2 = p->h2, h3 = p->h3, h4 = p->h4;
	__u64 r0 = p->r0, r1 = p->r1, r2 = p->r2, r3 = p->r3, r4 = p->r4;
	__u64 s1 = p->s1, s2 = p->s2, s3 = p->s3, s4 = p->s4;
	__u64 d0, d1, d2, d3, d4, c;

	h0 += lo & CP_MASK26;
	h1 += (lo >> 26) & CP_MASK26;
	h2 += ((lo >> 52) | (hi << 12)) & CP_MASK26;
	h3 += (hi >> 14) & CP_MASK26;
	h4 += (hi >> 40) | (1ULL << 24);

	d0 = h0 * r0 + h1 * s4 + h2 * s3 + h3 * s2 + h4 * s1;
	d1 = h0 * r1 + h1 * r0 + h2 * s4 + h3 * s3 + h4 * s2;
	d2 = h0 * r2 + h1 * r1 + h2 * r0 + h3 * s4 + h4 * s3;
	d3 = h0 * r3 + h1 * r2 + h2 * r1 + h3 * r0 + h4 * s4;
	d4 = h0 * r4 + h1 * r3 + h2 * r2 + h3 * r1 + h4 * r0;

	c = d0 >> 26; h0 = d0 & CP_MASK26; d1 += c;
	c = d1 >> 26; h1 = d1 & CP_MASK26; d2 += c;
	c = d2 >> 26; h2 = d2 & CP_MASK26; d3 += c;
	c = d3 >> 26; h3 = d3 & CP_MASK26; d4 += c;
	c = d4 >> 26; h4 = d4 & CP_MASK26;
	h0 += c * 5;
	c = h0 >> 26; h0 &= CP_MASK26; h1 += c;

	p->h0 = h0; p->h1 = h1; p->h2 = h2; p->h3 = h3; p->h4 = h4;
}

/* Poly1305 one-time key from the first 32 bytes of ChaCha20 block 0 in s->block (§2.6). */
static __always_inline void cp_poly_init(struct cp_scratch *s)
{
	struct cp_poly *p = &s->poly;
	__u64 *k = (__u64 *)s->block;
	__u64 lo = k[0], hi = k[1];

	p->r0 = lo & 0x3ffffff;
	p->r1 = (lo >> 26) & 0x3ffff03;
	p->r2 = ((lo >> 52) | (hi << 12)) & 0x3ffc0ff;
	p->r3 = (hi >> 14) & 0x3f03fff;
	p->r4 = (hi >> 40) & 0x00fffff;
	p->s1 = p->r1 * 5;
	p->s2 = p->r2 * 5;
	p->s3 = p->r3 * 5;
	p->s4 = p->r4 * 5;
	p->h0 = p->h1 = p->h2 = p->h3 = p->h4 = 0;
	p->pad_lo = k[2];
	p->pad_hi = k[3];
}

/* Keep bytes [0, @n) of a little-endian word, 0 <= n < 8. */
static __always_inline __u64 cp_low_bytes(__u64 w, __u64 n)
{
	return w & ((1ULL << (n * 8)) - 1);
}

/**
 * cp_poly_padded - absorb @len bytes of @buf, zero-padded to 16 (the AEAD's pad16).
 * NOTE: zeroes @buf from @len to the next multiple of 16 (callers keep nothing there).
 */
static __always_inline void cp_poly_padded(struct cp_poly *p, __u8 *buf, __u64 len,
					   __u32 max_blocks)
{
	__u64 blocks = (len + 15) / 16, rem = len & 15;
	__u64 *w = (__u64 *)(buf + (len & ~15ULL));
	__u32 i;

	CP_OPAQUE(blocks);

	if (rem >= 8) {
		w[1] = cp_low_bytes(w[1], rem - 8);
	} else {
		w[0] = cp_low_bytes(w[0], rem);
		w[1] = 0;
	}
#pragma clang loop unroll(disable)
	for (i = 0; i < max_blocks; i++) {
		if (i >= blocks)
			break;
		w = (__u64 *)(buf + (__u64)i * 16);
		cp_poly_block(p, w[0], w[1]);
	}
}

/* The final length block and h + s mod 2^128 (§2.5.1); returns the tag as two words. */
static __always_inline void cp_poly_finish(struct cp_poly *p, __u64 aad_len, __u64 ct_len,
					   __u64 *tag_lo, __u64 *tag_hi)
{
	__u64 h0, h1, h2, h3, h4, g0, g1, g2, g3, g4, c, mask, lo, hi, out;

	cp_poly_block(p, aad_len, ct_len);
	h0 = p->h0; h1 = p->h1; h2 = p->h2; h3 = p->h3; h4 = p->h4;

	c = h1 >> 26; h1 &= CP_MASK26; h2 += c;
	c = h2 >> 26; h2 &= CP_MASK26; h3 += c;
	c = h3 >> 26; h3 &= CP_MASK26; h4 += c;
	c = h4 >> 26; h4 &= CP_MASK26; h0 += c * 5;
	c = h0 >> 26; h0 &= CP_MASK26; h1 += c;

	/* g = h + 5 - 2^130; keep it when it did not borrow (h >= p). */
	g0 = h0 + 5; c = g0 >> 26; g0 &= CP_MASK26;
	g1 = h1 + c; c = g1 >> 26; g1 &= CP_MASK26;
	g2 = h2 + c; c = g2 >> 26; g2 &= CP_MASK26;
	g3 = h3 + c; c = g3 >> 26; g3 &= CP_MASK26;
	g4 = h4 + c - (1ULL << 26);
	mask = (g4 >> 63) - 1;		/* all ones when g4 did not borrow */
	g4 &= CP_MASK26;
	h0 = (h0 & ~mask) | (g0 & mask);
	h1 = (h1 & ~mask) | (g1 & mask);
	h2 = (h2 & ~mask) | (g2 & mask);
	h3 = (h3 & ~mask) | (g3 & mask);
	h4 = (h4 & ~mask) | (g4 & mask);

	lo = h0 | (h1 << 26) | (h2 << 52);
	hi = (h2 >> 12) | (h3 << 14) | (h4 << 40);
	out = lo + p->pad_lo;
	*tag_hi = hi + p->pad_hi + (out < lo);
	*tag_lo = out;
}

/**
 * cp_aead_tag - Poly1305 tag of AAD s->hdr[0, @aad_len) and ciphertext s->data[0, @ct_len)
 * under the one-time key from @key and the nonce (§2.8). @aad_len <= 32.
 */
static __always_inline void cp_aead_tag(struct cp_scratch *s, const __u32 *key, __u32 n0, __u32 n1,
					__u32 n2, __u64 aad_len, __u64 ct_len, __u64 *tag_lo,
					__u64 *tag_hi)
{
	cp_chacha20_block(key, 0, n0, n1, n2, s->block);
	cp_poly_init(s);
	cp_poly_padded(&s->poly, s->hdr, aad_len, 2);
	cp_poly_padded(&s->poly, s->data, ct_len, CP_MAX_POLY_BLOCKS);
	cp_poly_finish(&s->poly, aad_len, ct_len, tag_lo, tag_hi);
}

/**
 * cp_aead_seal - encrypt s->data[0, @ct_len) in place and write the tag to
 * s->data[@ct_len, @ct_len + 16). Returns nothing; lengths are the caller's to check.
 */
static __always_inline void cp_aead_seal(struct cp_scratch *s, const __u32 *key, __u32 n0,
					 __u32 n1, __u32 n2, __u64 aad_len, __u64 ct_len,
					 __u64 *tag_lo, __u64 *tag_hi)
{
	cp_chacha20_xor(s, key, 1, n0, n1, n2, ct_len);
	cp_aead_tag(s, key, n0, n1, n2, aad_len, ct_len, tag_lo, tag_hi);
}

/**
 * cp_aead_open - verify the tag in s->tag over AAD s->hdr and ciphertext s->data, then
 * decrypt s->data in place. Returns 0 when the tag verified, -1 otherwise (data untouched).
 */
static __always_inline int cp_aead_open(struct cp_scratch *s, const __u32 *key, __u32 n0,
					__u32 n1, __u32 n2, __u64 aad_len, __u64 ct_len)
{
	__u64 lo, hi, diff;
	const __u64 *want = (const __u64 *)s->tag;

	cp_aead_tag(s, key, n0, n1, n2, aad_len, ct_len, &lo, &hi);
	diff = (lo ^ want[0]) | (hi ^ want[1]);
	if (diff != 0)
		return -1;
	cp_chacha20_xor(s, key, 1, n0, n1, n2, ct_len);
	return 0;
}

/**
 * cp_hp_mask - QUIC header protection mask with ChaCha20 (RFC 9001 §5.4.4): the first
 * five bytes of ChaCha20(@hp_key, counter = sample[0..3] LE, nonce = sample[4..15]) on
 * zeros. Returns them in the low 40 bits, byte 0 lowest.
 */
static __always_inline __u64 cp_hp_mask(struct cp_scratch *s, const __u32 *hp_key)
{
	const __u32 *w = (const __u32 *)s->sample;

	CP_BARRIER();	/* the sample may just have been written as u64 words */
	cp_chacha20_block(hp_key, w[0], w[1], w[2], w[3], s->block);
	return (__u64)s->block[0] | ((__u64)(s->block[1] & 0xff) << 32);
}

#endif /* FASTRELAY_CHACHA20POLY1305_H */
