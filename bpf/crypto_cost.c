/* crypto_cost.c: the soft shim's primitives on their own, for `fastrelay bench`.
 *
 * Loaded by relay/bench/measure.py (crypto_primitives) and run with BPF_PROG_TEST_RUN on
 * a frame whose length past the Ethernet header is the number of bytes to process; never
 * attached to an interface. Each program runs exactly the code the shim inlines
 * (chacha20poly1305.h), so the bench can say where a packet's time goes: the keystream,
 * the authenticator, or the packet handling around them. Timing two lengths and taking
 * the difference removes each program's fixed cost.
 *
 *   cost_chacha20   ChaCha20 keystream XORed over the bytes (RFC 8439 §2.4)
 *   cost_poly1305   Poly1305 over the bytes, zero-padded (RFC 8439 §2.5)
 *   cost_clock      COST_CLOCK_ADDS dependent 32-bit additions: one cycle each on any
 *                   out-of-order x86 or arm64 core, so their time is the clock period
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>

#include "chacha20poly1305.h"

#define COST_CLOCK_BATCH 100	/* additions per asm statement */
#define COST_CLOCK_ADDS (COST_CLOCK_BATCH * 1000)

BPF_PERCPU_ARRAY(cost_scratch, struct cp_scratch, 1);

/* The bytes to process: the frame past its Ethernet header, at most CP_MAX_DATA. */
static __always_inline __u64 cost_len(struct __sk_buff *skb)
{
	__u64 len = skb->len;

	if (len < ETH_HLEN || len - ETH_HLEN > CP_MAX_DATA)
		return 0;
	len -= ETH_HLEN;
	CP_OPAQUE(len);
	if (len > CP_MAX_DATA)
		return 0;
	return len;
}

int cost_chacha20(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct cp_scratch *s = cost_scratch.lookup(&zero);
	__u64 len = cost_len(skb);

	if (!s || !len)
		return TC_ACT_SHOT;
	/* The key is whatever the scratch holds: the cost does not depend on it. */
	cp_chacha20_xor(s, (const __u32 *)s->hdr, 1, 0, 0, 0, len);
	return TC_ACT_OK;
}

int cost_poly1305(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct cp_scratch *s = cost_scratch.lookup(&zero);
	__u64 len = cost_len(skb);

	if (!s || !len)
		return TC_ACT_SHOT;
	cp_poly_init(s);
	cp_poly_padded(&s->poly, s->data, len, CP_MAX_POLY_BLOCKS);
	return TC_ACT_OK;
}

/* Ten dependent additions, 32-bit (cp_add32, chacha20poly1305.h: operand rN as wN). */
#define COST_ADD10                                                              \
	"cp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\t" \
	"cp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\t" \
	"cp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\tcp_add32 %[acc], %[k]\n\t" \
	"cp_add32 %[acc], %[k]\n\t"

int cost_clock(struct __sk_buff *skb)
{
	__u64 acc = skb->len, k = 3;
	int i;

#pragma clang loop unroll(disable)
	for (i = 0; i < COST_CLOCK_ADDS / COST_CLOCK_BATCH; i++)
		asm volatile(COST_ADD10 COST_ADD10 COST_ADD10 COST_ADD10 COST_ADD10
			     COST_ADD10 COST_ADD10 COST_ADD10 COST_ADD10 COST_ADD10
			     : [acc] "+r"(acc) : [k] "r"(k));
	return TC_ACT_OK;
}
