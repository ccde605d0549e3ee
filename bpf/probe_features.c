/* probe_features.c - tiny programs proving what bcc can use of this kernel's BPF.
 *
 * Loaded by offload/bcc_proofs.py (`fastrelay probe`), never attached to an interface.
 * One function per feature, each loaded on its own so one refusal does not hide the
 * others. The default unit holds everything bcc 0.26 is expected to handle; features
 * whose mere presence could break the whole compile unit sit behind -D flags and are
 * compiled separately:
 *   -DPROBE_BPF_LOOP  bpf_loop() with a callback (bcc 0.26 leaves the callback address 0)
 *   -DPROBE_KFUNC     a kfunc call (bcc 0.26 has no BTF-id relocation for kfuncs)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#if defined(PROBE_BPF_LOOP)

static int probe_loop_step(u32 index, void *ctx)
{
	return 0;
}

/* bpf_loop(): bounded iteration through a helper and a callback (kernel 5.17+). */
int probe_bpf_loop(struct __sk_buff *skb)
{
	bpf_loop(4, probe_loop_step, NULL, 0);
	return TC_ACT_OK;
}

#elif defined(PROBE_KFUNC)

#ifndef __ksym
#define __ksym __attribute__((section(".ksyms")))
#endif

extern int bpf_dynptr_from_skb(struct __sk_buff *skb, u64 flags,
			       struct bpf_dynptr *ptr) __ksym;

/* A kfunc call from SCHED_CLS: what the kernel's BPF crypto API (bpf_crypto_*) needs. */
int probe_kfunc_call(struct __sk_buff *skb)
{
	struct bpf_dynptr ptr;

	bpf_dynptr_from_skb(skb, 0, &ptr);
	return TC_ACT_OK;
}

#else /* the default unit */

/* Value with a lock: the layout the kernel checks through the map's BTF. */
struct probe_locked {
	struct bpf_spin_lock lock;
	u64 value;
};

/* Ring buffer the fast path would use for registration and punt records. */
BPF_RINGBUF_OUTPUT(probe_events, 1);
/* Counter for the atomic fetch-and-add proof (test-run twice: returns 0, then 1). */
BPF_ARRAY(probe_counter, u64, 1);
/* Value guarded by a bpf_spin_lock. */
BPF_ARRAY(probe_locked_map, struct probe_locked, 1);
/* Per-CPU scratch, the `soft` shim's keystream and Poly1305 state live in one. */
BPF_PERCPU_ARRAY(probe_scratch, u64, 8);

/* The baseline: bcc compiles and the kernel loads a TC classifier. */
int probe_sched_cls(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

/* bpf_clone_redirect(): the fan-out primitive (only loaded, never run). */
int probe_clone_redirect(struct __sk_buff *skb)
{
	long err = bpf_clone_redirect(skb, skb->ifindex, 0);

	return err ? TC_ACT_SHOT : TC_ACT_OK;
}

int probe_ringbuf(struct __sk_buff *skb)
{
	u64 record = skb->len;

	probe_events.ringbuf_output(&record, sizeof(record), 0);
	return TC_ACT_OK;
}

/* Fetch-and-add whose result is used: needs BPF_ATOMIC | BPF_FETCH from LLVM and kernel. */
int probe_atomics(struct __sk_buff *skb)
{
	int key = 0;
	u64 *counter = probe_counter.lookup(&key);

	if (!counter)
		return TC_ACT_SHOT;
	return (int)__sync_fetch_and_add(counter, 1);
}

int probe_spin_lock(struct __sk_buff *skb)
{
	int key = 0;
	struct probe_locked *v = probe_locked_map.lookup(&key);

	if (!v)
		return TC_ACT_SHOT;
	bpf_spin_lock(&v->lock);
	v->value++;
	bpf_spin_unlock(&v->lock);
	return TC_ACT_OK;
}

/* A real back-edge (unrolling disabled; the probe checks the bytecode has one). The
 * bound comes from the packet so clang cannot fold the loop into a constant. */
int probe_bounded_loop(struct __sk_buff *skb)
{
	u32 n = skb->len;
	u32 acc = 0;

#pragma clang loop unroll(disable)
	for (u32 i = 0; i < 64; i++) {
		if (i >= n)
			break;
		acc = (acc << 5) ^ (acc >> 27) ^ i;
	}
	return acc & 1 ? TC_ACT_OK : TC_ACT_SHOT;
}

int probe_percpu_array(struct __sk_buff *skb)
{
	int key = 0;
	u64 *slot = probe_scratch.lookup(&key);

	if (!slot)
		return TC_ACT_SHOT;
	*slot += skb->len;
	return TC_ACT_OK;
}

/* The trivial program `fastrelay probe --active` attaches to a scratch veth. */
int probe_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

#endif /* PROBE_BPF_LOOP / PROBE_KFUNC / default */
