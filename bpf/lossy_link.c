/* lossy_link.c: random loss at the receiving end of a lab link.
 *
 * netem is not built into the development kernel, so the lab drops packets itself:
 * this TC ingress program sits on the receiving interface of a link, so the sender's
 * send succeeded and the packet is really lost on the "wire". hw/lab.py loads it once
 * per lab, pins its maps under /sys/fs/bpf/fastrelay/labs/<lab>/ and attaches it
 * (direct action, clsact ingress, preference 1) to every link end with loss.
 *
 * Verdicts: TC_ACT_SHOT for a dropped packet; TC_ACT_UNSPEC otherwise, so any filter
 * added after it on the same hook (the relay's fast path) still runs.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lab_structs.h"

/* Per slot: drop threshold and whether the slot is in use; written by hw/lab.py. */
BPF_ARRAY(lab_link_config, struct lab_link_config, LAB_MAX_SLOTS);
/* Per slot and CPU: packets and bytes seen and dropped; read by hw/lab.py. */
BPF_PERCPU_ARRAY(lab_link_stats, struct lab_link_stats, LAB_MAX_SLOTS);

int lossy_link_ingress(struct __sk_buff *skb)
{
	/* Interfaces below the base wrap to a huge slot and pass untouched. */
	__u32 slot = skb->ifindex - LAB_IFINDEX_BASE;
	if (slot >= LAB_MAX_SLOTS)
		return TC_ACT_UNSPEC;

	struct lab_link_config *cfg = lab_link_config.lookup(&slot);
	if (!cfg || !cfg->enabled)
		return TC_ACT_UNSPEC;
	struct lab_link_stats *st = lab_link_stats.lookup(&slot);
	if (!st)
		return TC_ACT_UNSPEC;

	/* Per-CPU value and TC runs with migration off: plain increments are exact. */
	st->packets++;
	st->bytes += skb->len;
	if (bpf_get_prandom_u32() < cfg->drop_threshold) {
		st->dropped_packets++;
		st->dropped_bytes += skb->len;
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}
