/* reasons.h: numbered outcomes of the fast path: counters, pass/drop and punt reasons.
 *
 * Each number is an index into the per-CPU counter array fr_stats (packets and bytes)
 * and, for punts, the reason in the ring record. NEVER renumber: retired reasons stay as
 * FR_UNUSED_<n>. relay/fastpath/reasons.py mirrors this list as an IntEnum and
 * tests/test_fastpath_layout.py checks that the two agree.
 *
 * Ranges: 1..31 ingress, 32..63 egress (pass, drop, sent), 64..127 egress punts
 * (the clone or userspace packet is withheld and a punt record tells userspace).
 */
#ifndef FASTRELAY_REASONS_H
#define FASTRELAY_REASONS_H

/* --- ingress ----------------------------------------------------------------------- */
#define FR_IN_SEEN 1			/* every packet the ingress program saw */
#define FR_IN_PASS_NOT_UDP 2		/* not IPv4/IPv6 UDP: up untouched */
#define FR_IN_PASS_MALFORMED 3		/* truncated or inconsistent L2/L3/L4/QUIC header */
#define FR_IN_PASS_LONG_HEADER 4	/* QUIC long header (Initial, Handshake, 0-RTT, Retry) */
#define FR_IN_PASS_UNKNOWN_CID 5	/* short header whose DCID is no known connection */
#define FR_IN_PASS_GSO 6		/* GSO super-packet: per-datagram logic would see one header */
#define FR_IN_PASS_NOT_UPSTREAM 7	/* a subscriber's packet to the relay: userspace only */
#define FR_IN_PASS_NOT_FORWARDED 8	/* upstream packet without a STREAM frame of a forwarded stream */
#define FR_IN_PASS_FRAME_LIMIT 9	/* more than MAX_FRAMES frames, or an unknown frame type */
#define FR_IN_PASS_BAD_FRAME 10		/* a frame runs past the payload */
#define FR_IN_CLONED 11			/* packets that reached the clone loop */
#define FR_IN_CLONE 12			/* clones made (one per subscriber) */
#define FR_IN_CLONE_ERR 13		/* bpf_clone_redirect failed for one subscriber */
#define FR_IN_FANOUT_LIMIT 14		/* subscribers past MAX_SUBSCRIBERS_PER_UPSTREAM: userspace serves them */
#define FR_IN_SUB_SKIPPED 15		/* a listed subscriber slot inactive or without ifindex */
#define FR_IN_PASS_IP_OPTIONS 16	/* IPv4 options or IPv6 extension headers */
#define FR_IN_PASS_FRAGMENT 17		/* IPv4 fragment */
#define FR_IN_PASS_NOT_VERIFIED 18	/* upstream with offloaded crypto, but no verified verdict from the shim */
#define FR_IN_PASS_PROTECTED 19		/* upstream protected by userspace: payload unreadable here */
#define FR_IN_PASS_NO_PROG 20		/* a tail-call stage is missing (loader incomplete) */

/* --- egress: pass, drop, sent -------------------------------------------------------- */
#define FR_EG_SEEN 32			/* every packet the egress program saw */
#define FR_EG_PASS_NOT_OURS 33		/* not a fast-path clone nor a short header to a known peer */
#define FR_EG_PASS_LONG_HEADER 34	/* userspace long-header packet: its own PN spaces, untouched */
#define FR_EG_RENUMBERED 35		/* userspace 1-RTT packet renumbered and reported */
#define FR_EG_SENT_CLONE 36		/* clone rewritten, reported and sent */
#define FR_EG_DROP_NO_KEYS 37		/* 1-RTT for a connection offloaded without keys: never plaintext */
#define FR_EG_PASS_PROTECTED 38		/* userspace-protected connection: untouched */
#define FR_EG_DROP_BAD_CLONE 39		/* a clone whose headers no longer parse */
#define FR_EG_RING_FULL 40		/* a record could not be reserved (the packet still went/was withheld) */
#define FR_EG_DROP_EMPTY 41		/* a clone with nothing for this subscriber (all frames padded) */
#define FR_EG_PASS_UPSTREAM 42		/* 1-RTT packet to an upstream connection: untouched */
#define FR_EG_PASS_MALFORMED 43		/* userspace packet to a subscriber that does not parse: untouched */
#define FR_EG_DROP_NO_PROG 44		/* a clone whose tail-call stage is missing: dropped */
#define FR_EG_RESIZED 45		/* a sent clone whose DCID, PN or stream ids changed size (also SENT_CLONE) */

/* --- egress punts: withheld, punt record emitted ------------------------------------- */
#define FR_PUNT_NO_SUBSCRIBER 64	/* clone for a subscriber slot that is gone */
#define FR_PUNT_NO_CREDIT 65		/* connection flow-control credit (MAX_DATA) exhausted */
#define FR_PUNT_NO_STREAM_CREDIT 66	/* stream flow-control credit (MAX_STREAM_DATA) exhausted */
#define FR_PUNT_NO_MAX_STREAMS 67	/* opening the stream would exceed MAX_STREAMS */
#define FR_PUNT_NO_CWND 68		/* congestion window full */
#define FR_PUNT_PN_GROW 69		/* PN needs more bytes than the packet has and the grown packet would
					 * pass fr_sub.max_udp_payload (or it is 0), or more than 4 bytes */
#define FR_PUNT_SID_GROW 70		/* a stream id needs a wider varint and the grown packet would pass
					 * the limit (or it is 0), or the id sits past FR_GROW_MAX_HEAD */
#define FR_PUNT_CID_LEN 71		/* subscriber DCID longer than the upstream's and the grown packet
					 * would pass the limit (or it is 0); the first growing field of
					 * DCID (71), PN (69), stream ids (70) names the punt */
#define FR_PUNT_FAMILY 72		/* IPv4 packet for an IPv6 subscriber or the reverse */
#define FR_PUNT_MAP_FULL 73		/* a translation entry could not be inserted */
#define FR_PUNT_FRAME_LIMIT 74		/* too many or unknown frames to rewrite */
#define FR_PUNT_BAD_FRAME 75		/* a frame runs past the payload */
#define FR_PUNT_NO_KEYS 76		/* subscriber offloaded without keys yet */
#define FR_PUNT_PROTECTED 77		/* subscriber protected by userspace: the kernel cannot write for it */
#define FR_PUNT_STREAM_OVERLAP 78	/* frame partly covers a range already forwarded */
#define FR_PUNT_RECORD_FRAMES 79	/* more STREAM/DATAGRAM frames than a record describes */
#define FR_PUNT_USER_PN_GROW 80		/* userspace packet whose new PN does not fit: dropped, reported */
#define FR_PUNT_GSO 81			/* GSO clone */
#define FR_PUNT_ALIAS_WIDTH 82		/* the subscriber's track alias does not fit the upstream's width
					 * (or the MoQT header is not whole in the frame) */
#define FR_PUNT_RESIZE_PARTIAL 83	/* a CHECKSUM_PARTIAL clone (resized at the tail: the UDP header
					 * must stay at csum_start) with more than FR_GROW_MAX_TAIL
					 * bytes behind its last edit */
#define FR_PUNT_RESIZE_FAILED 84	/* bpf_skb_adjust_room or a write of the resize failed */

#define FR_REASON_MAX 128		/* entries of fr_stats */

#endif /* FASTRELAY_REASONS_H */
