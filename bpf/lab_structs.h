/* lab_structs.h: layouts the lab's loss program (lossy_link.c) shares with hw/lab.py.
 *
 * hw/lab.py mirrors every struct and constant here with ctypes, and
 * tests/test_lab.py checks that the two agree field by field: change both together.
 */
#ifndef FASTRELAY_LAB_STRUCTS_H
#define FASTRELAY_LAB_STRUCTS_H

/* Every lab interface gets ifindex LAB_IFINDEX_BASE + slot (slot = 2 * link + end),
 * unique within one lab across all its namespaces, so one program and one pair of
 * maps serve every link end: the program finds its slot from skb->ifindex. */
#ifndef LAB_IFINDEX_BASE
#define LAB_IFINDEX_BASE 1000
#endif

/* Slots per lab (two per link): entries of both maps. */
#ifndef LAB_MAX_SLOTS
#define LAB_MAX_SLOTS 2048
#endif

/* What the loss program does on one link end (the receiving interface). */
struct lab_link_config {
	__u32 drop_threshold;	/* drop when bpf_get_prandom_u32() < this: probability * 2^32 */
	__u32 enabled;		/* 0: slot unused, packets pass uncounted */
};

/* What arrived at one link end, per CPU (sum over CPUs). Bytes are frame lengths,
 * Ethernet header included. packets counts every frame seen, dropped ones too. */
struct lab_link_stats {
	__u64 packets;
	__u64 bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
};

#endif /* FASTRELAY_LAB_STRUCTS_H */
