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


/* 32-bit ALU in ChaCha20's quarter round. bcc 0.26 emits the v1 instruction set, in
 * which LLVM has no 32-bit arithmetic, so a 32-bit rotation costs a mask and a mov
 * on top of its shifts. The kernel has always accepted the 32-bit ALU class (BPF_ALU,
 * zero-extending); only the assembler names its registers w0..w9 while an inline-asm
 * operand prints as rN. These assembler macros map an operand's rN to wN:
 * `cp_add32 %[a], %[b]` becomes `wA += wB` (two levels of macro, one per operand).
 * Defined once here, at file scope; the assembler keeps macros for the whole file. */
#define CP_W_RR(name, op, n)                                                   \
	".macro " name "_r" #n " b\n " name "__\\b w" #n "\n.endm\n"           \
	".macro " name "__r" #n " wa\n \\wa " op " w" #n "\n.endm\n"
#define CP_W_RI(name, op, n) ".macro " name "_r" #n " k\n w" #n " " op " \\k\n.endm\n"
#define CP_W_ALL(m, name, op)                                                  \
	m(name, op, 0) m(name, op, 1) m(name, op, 2) m(name, op, 3) m(name, op, 4) \
	m(name, op, 5) m(name, op, 6) m(name, op, 7) m(name, op, 8) m(name, op, 9)
#define CP_W_OP(name, op)                                                      \
	".macro " name " a, b\n " name "_\\a \\b\n.endm\n" CP_W_ALL(CP_W_RR, name, op)
#define CP_W_SHIFT(name, op)                                                   \
	".macro " name " a, k\n " name "_\\a \\k\n.endm\n" CP_W_ALL(CP_W_RI, name, op)
asm(CP_W_OP("cp_add32", "+=") CP_W_OP("cp_xor32", "^=") CP_W_OP("cp_or32", "|=")
    CP_W_OP("cp_mov32", "=") CP_W_SHIFT("cp_lsh32", "<<=") CP_W_SHIFT("cp_rsh32", ">>="));

/* a += b; d ^= a; d <<<= n, all 32-bit: six instructions (t is scratch). */
#define CP_STEP(a, b, d, n, m)                                  \
	"cp_add32 " a ", " b "\n\t"                             \
	"cp_xor32 " d ", " a "\n\t"                             \
	"cp_mov32 %[t], " d "\n\t"                              \
	"cp_lsh32 " d ", " #n "\n\t"                            \
	"cp_rsh32 %[t], " #m "\n\t"                              \
	"cp_or32 " d ", %[t]\n\t"

/* One quarter round (RFC 8439 §2.1) as one asm statement: LLVM cannot interleave
 * quarter rounds (which made it spill around every step), each needs five registers. */
#define CP_QR(va, vb, vc, vd)                                                  \
	do {                                                                   \
		__u64 t_;                                                      \
		asm volatile(CP_STEP("%[a]", "%[b]", "%[d]", 16, 16)               \
			     CP_STEP("%[c]", "%[d]", "%[b]", 12, 20)               \
			     CP_STEP("%[a]", "%[b]", "%[d]", 8, 24)               \
			     CP_STEP("%[c]", "%[d]", "%[b]", 7, 25)               \
			     : [a] "+r"(va), [b] "+r"(vb), [c] "+r"(vc), [d] "+r"(vd), \
			       [t] "=&r"(t_));                                 \
	} while (0)

/**
 * cp_chacha20_block - one ChaCha20 block (RFC 8439 §2.3) into s->block.
 * @key: eight little-endian key words
 * @counter: the block counter
 * @n0, @n1, @n2: the nonce as three little-endian words
 */
static __always_inline void cp_chacha20_block(struct cp_scratch *s, const __u32 *key,
					      __u32 counter, __u32 n0, __u32 n1, __u32 n2)
{
	__u64 x0 = 0x61707865, x1 = 0x3320646e, x2 = 0x79622d32, x3 = 0x6b206574;
	__u64 x4 = key[0], x5 = key[1], x6 = key[2], x7 = key[3];
	__u64 x8 = key[4], x9 = key[5], x10 = key[6], x11 = key[7];
	__u64 x12 = counter, x13 = n0, x14 = n1, x15 = n2;
	__u32 *out = s->block;
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
		cp_chacha20_block(s, key, counter + i, n0, n1, n2);
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

/* A key limb read from the map value where it is used: hoisted out of the block loop, the
 * nine limbs were spilled to the stack and stored back on every block. */
#define CP_KEY(p, f) (*(volatile const __u64 *)&(p)->f)

/* Poly1305 (RFC 8439 §2.5): one 16-byte block @lo|@hi plus 2^128 into the accumulator
 * @h (five radix-2^26 limbs, held by the caller in registers across a loop: reading and
 * writing it through the map value each block put a store and a load on the critical
 * path). The carries run as two interleaved chains (d0..d2->h3->h4 and d3..d4->h0->h1)
 * instead of one: shorter latency; h1 and h4 stay below 2^27, products below 2^60. */
static __always_inline void cp_poly_mul(const struct cp_poly *p, __u64 *h, __u64 lo, __u64 hi)
{
	__u64 h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4];
	__u64 d0, d1, d2, d3, d4, c;

	h0 += lo & CP_MASK26;
	h1 += (lo >> 26) & CP_MASK26;
	h2 += ((lo >> 52) | (hi << 12)) & CP_MASK26;
	h3 += (hi >> 14) & CP_MASK26;
	h4 += (hi >> 40) | (1ULL << 24);

	d0 = h0 * CP_KEY(p, r0) + h1 * CP_KEY(p, s4) + h2 * CP_KEY(p, s3) + h3 * CP_KEY(p, s2) + h4 * CP_KEY(p, s1);
	d1 = h0 * CP_KEY(p, r1) + h1 * CP_KEY(p, r0) + h2 * CP_KEY(p, s4) + h3 * CP_KEY(p, s3) + h4 * CP_KEY(p, s2);
	d2 = h0 * CP_KEY(p, r2) + h1 * CP_KEY(p, r1) + h2 * CP_KEY(p, r0) + h3 * CP_KEY(p, s4) + h4 * CP_KEY(p, s3);
	d3 = h0 * CP_KEY(p, r3) + h1 * CP_KEY(p, r2) + h2 * CP_KEY(p, r1) + h3 * CP_KEY(p, r0) + h4 * CP_KEY(p, s4);
	d4 = h0 * CP_KEY(p, r4) + h1 * CP_KEY(p, r3) + h2 * CP_KEY(p, r2) + h3 * CP_KEY(p, r1) + h4 * CP_KEY(p, r0);

	c = d0 >> 26; h0 = d0 & CP_MASK26; d1 += c;
	c = d3 >> 26; h3 = d3 & CP_MASK26; d4 += c;
	c = d1 >> 26; h1 = d1 & CP_MASK26; d2 += c;
	c = d4 >> 26; h4 = d4 & CP_MASK26; h0 += c * 5;
	c = d2 >> 26; h2 = d2 & CP_MASK26; h3 += c;
	c = h0 >> 26; h0 &= CP_MASK26; h1 += c;
	c = h3 >> 26; h3 &= CP_MASK26; h4 += c;

	h[0] = h0; h[1] = h1; h[2] = h2; h[3] = h3; h[4] = h4;
}

/* One block into the accumulator kept in @p. */
static __always_inline void cp_poly_block(struct cp_poly *p, __u64 lo, __u64 hi)
{
	__u64 h[5] = {p->h0, p->h1, p->h2, p->h3, p->h4};

	cp_poly_mul(p, h, lo, hi);
	p->h0 = h[0]; p->h1 = h[1]; p->h2 = h[2]; p->h3 = h[3]; p->h4 = h[4];
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
	__u64 h[5];
	__u32 i;

	CP_OPAQUE(blocks);

	if (rem >= 8) {
		w[1] = cp_low_bytes(w[1], rem - 8);
	} else {
		w[0] = cp_low_bytes(w[0], rem);
		w[1] = 0;
	}
	h[0] = p->h0; h[1] = p->h1; h[2] = p->h2; h[3] = p->h3; h[4] = p->h4;
#pragma clang loop unroll(disable)
	for (i = 0; i < max_blocks; i++) {
		if (i >= blocks)
			break;
		w = (__u64 *)(buf + (__u64)i * 16);
		cp_poly_mul(p, h, w[0], w[1]);
	}
	p->h0 = h[0]; p->h1 = h[1]; p->h2 = h[2]; p->h3 = h[3]; p->h4 = h[4];
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
	cp_chacha20_block(s, key, 0, n0, n1, n2);
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
	cp_chacha20_block(s, hp_key, w[0], w[1], w[2], w[3]);
	return (__u64)s->block[0] | ((__u64)(s->block[1] & 0xff) << 32);
}

#endif /* FASTRELAY_CHACHA20POLY1305_H */
