/* maps.h: every map of the fast path, declarations only (bcc macros).
 *
 * Capacities come from consts.h, layouts from structs.h. The loader compiles both
 * programs in one module, so ingress and egress share these maps.
 */
#ifndef FASTRELAY_MAPS_H
#define FASTRELAY_MAPS_H

#include "structs.h"
#include "reasons.h"

/* Global settings (relay CID length), one entry; userspace writes. */
BPF_ARRAY(fr_config, struct fr_config, 1);
/* Relay-chosen CID -> connection index: ingress demux of short headers; userspace writes. */
BPF_HASH(fr_cids, struct fr_cid_key, __u32, MAX_HOST_CIDS);
/* Peer address -> connection index: egress demux of userspace packets; userspace writes. */
BPF_HASH(fr_peers, struct fr_addr_key, __u32, MAX_CONNECTIONS);
/* Per-connection state (role, protection); shared with the crypto shim; userspace writes. */
BPF_ARRAY(fr_conns, struct fr_conn, MAX_CONNECTIONS);
/* Upstream connection -> its subscribers (the fan-out list); userspace writes. */
BPF_ARRAY(fr_upstreams, struct fr_upstream, MAX_UPSTREAMS);
/* Subscriber state: addresses, DCID, PN and stream-id counters, credit; both write. */
BPF_ARRAY(fr_subs, struct fr_sub, MAX_SUBSCRIBERS);
/* Forwarded tracks of upstream connections; userspace writes. */
BPF_HASH(fr_tracks, struct fr_track_key, struct fr_track, MAX_TRACKS);
/* Which subscriber gets which upstream track (and its alias there); userspace writes. */
BPF_HASH(fr_sub_tracks, struct fr_sub_track_key, struct fr_sub_track, MAX_TRACKS * 16);
/* Upstream streams seen from offset 0 (track, priority); ingress inserts, userspace deletes. */
BPF_HASH(fr_up_streams, struct fr_up_stream_key, struct fr_up_stream, MAX_UPSTREAM_STREAMS);
/* Per-subscriber stream translations; egress inserts and advances, userspace deletes. */
BPF_HASH(fr_sub_streams, struct fr_sub_stream_key, struct fr_sub_stream, MAX_SUBSCRIBER_STREAMS);
/* Packets and bytes per reason (reasons.h), per CPU. */
BPF_PERCPU_ARRAY(fr_stats, struct fr_counter, FR_REASON_MAX);
/* Walker state and the record being built, per CPU (struct fr_scratch). */
BPF_PERCPU_ARRAY(fr_scratch, struct fr_scratch, 2);
/* Tail-call stages (FR_PROG_*): the frame walkers run one frame per call so the
 * verifier sees one frame, not MAX_FRAMES; the loader fills it. */
BPF_PROG_ARRAY(fr_progs, FR_PROG_MAX);
/* Sent and punt records (struct fr_record) for userspace. */
BPF_RINGBUF_OUTPUT(fr_events, RINGBUF_PAGES);

/* Count one packet of skb under reason (reasons.h); the only place counters change. */
static __always_inline void fr_count(__u32 reason, __u32 bytes)
{
	struct fr_counter *c = fr_stats.lookup(&reason);
	if (!c)
		return;
	c->packets += 1;	/* per-CPU value, TC runs with migration off: exact */
	c->bytes += bytes;
}

#endif /* FASTRELAY_MAPS_H */
