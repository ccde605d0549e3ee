/* consts.h: sizes (overridable with -D), protocol constants and flags of the fast path.
 *
 * Every tunable sits inside #ifndef so the loader (relay/fastpath/loader.py) can override
 * it; relay/fastpath/layout.py mirrors the ones Python needs and a test checks them.
 */
#ifndef FASTRELAY_CONSTS_H
#define FASTRELAY_CONSTS_H

/* --- capacities (map entries, loop bounds) ---------------------------------------- */

/* Subscribers one upstream connection fans out to in the kernel; the rest go through
 * userspace (counted as FR_PUNT_FANOUT_LIMIT). The clone loop runs at most this often. */
#ifndef MAX_SUBSCRIBERS_PER_UPSTREAM
#define MAX_SUBSCRIBERS_PER_UPSTREAM 64
#endif

/* Connections known to the fast path (entries of fr_conns), upstream or subscriber. */
#ifndef MAX_CONNECTIONS
#define MAX_CONNECTIONS 4096
#endif

/* Upstream (publisher-side) connections with a subscriber list (entries of fr_upstreams). */
#ifndef MAX_UPSTREAMS
#define MAX_UPSTREAMS 256
#endif

/* Subscriber connections (entries of fr_subs); a clone's mark carries the index. */
#ifndef MAX_SUBSCRIBERS
#define MAX_SUBSCRIBERS 1024
#endif

/* Host connection ids (ingress demux keys) across all connections. */
#ifndef MAX_HOST_CIDS
#define MAX_HOST_CIDS 16384
#endif

/* Forwarded tracks (upstream connection, track alias). */
#ifndef MAX_TRACKS
#define MAX_TRACKS 4096
#endif

/* Upstream streams the fast path knows (upstream connection, stream id). */
#ifndef MAX_UPSTREAM_STREAMS
#define MAX_UPSTREAM_STREAMS 65536
#endif

/* Per-subscriber stream translations (subscriber, upstream, upstream stream id). */
#ifndef MAX_SUBSCRIBER_STREAMS
#define MAX_SUBSCRIBER_STREAMS 262144
#endif

/* Ring buffer of sent/punt records, in pages (4 KiB each, power of two). */
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif

/* Records submitted per CPU between two wakeups of the reader (power of two); the
 * others go without a wakeup (a wakeup costs microseconds per packet), so the relay
 * drains fr_events on its own timer too. */
#ifndef RING_WAKEUP_EVERY
#define RING_WAKEUP_EVERY 64
#endif

/* Frames walked per packet; a packet with more goes up untouched (FR_PASS_FRAME_LIMIT)
 * or, for a clone, is punted (FR_PUNT_FRAME_LIMIT). */
#ifndef MAX_FRAMES
#define MAX_FRAMES 24
#endif

/* ACK ranges (gap, length pairs) walked in one ACK frame. */
#ifndef MAX_ACK_RANGES
#define MAX_ACK_RANGES 16
#endif

/* STREAM/DATAGRAM frames described in one ring record; a clone carrying more is punted. */
#ifndef MAX_RECORD_FRAMES
#define MAX_RECORD_FRAMES 4
#endif

/* Longest packet the walkers handle (bytes of the whole frame); offsets are masked with
 * FR_OFF_MASK so the verifier sees one bounded range. */
#define FR_MAX_PKT 16384
#define FR_OFF_MASK (FR_MAX_PKT - 1)

/* Tail-call stages in fr_progs (the loader installs them). */
#define FR_PROG_IN_WALK 0		/* fastpath_ingress_walk: one frame per call */
#define FR_PROG_IN_CLONE 1		/* fastpath_ingress_clone: the fan-out loop */
#define FR_PROG_EG_WALK 2		/* fastpath_egress_walk: one frame per call */
#define FR_PROG_EG_SEND 3		/* fastpath_egress_send: headers, PN, record */
#define FR_PROG_MAX 4

/* --- QUIC (RFC 9000) --------------------------------------------------------------- */

#define QUIC_MAX_CID_LEN 20		/* §17.2: connection ids are 0..20 bytes */
#define QUIC_HDR_FORM_LONG 0x80		/* §17.2: first byte, header form bit */
#define QUIC_FIXED_BIT 0x40		/* §17.2/§17.3: must be 1 */
#define QUIC_SHORT_SPIN_BIT 0x20	/* §17.3.1 */
#define QUIC_SHORT_KEY_PHASE 0x04	/* §17.3.1 */
#define QUIC_PN_LEN_MASK 0x03		/* §17.3.1: packet number length - 1 */
#define QUIC_VERSION_1 0x00000001
#define QUIC_VERSION_2 0x6b3343cf	/* RFC 9369 */
#define QUIC_V1_TYPE_INITIAL 0		/* §17.2: long packet type, bits 0x30 of the first byte */
#define QUIC_V1_TYPE_RETRY 3
#define QUIC_V2_TYPE_INITIAL 1		/* RFC 9369 §3.2 */
#define QUIC_V2_TYPE_RETRY 0

/* Frame types (RFC 9000 §19, RFC 9221 DATAGRAM). */
#define QUIC_FRAME_PADDING 0x00
#define QUIC_FRAME_PING 0x01
#define QUIC_FRAME_ACK 0x02
#define QUIC_FRAME_ACK_ECN 0x03
#define QUIC_FRAME_RESET_STREAM 0x04
#define QUIC_FRAME_STOP_SENDING 0x05
#define QUIC_FRAME_CRYPTO 0x06
#define QUIC_FRAME_NEW_TOKEN 0x07
#define QUIC_FRAME_STREAM 0x08		/* 0x08..0x0f */
#define QUIC_FRAME_STREAM_MAX 0x0f
#define QUIC_STREAM_BIT_OFF 0x04
#define QUIC_STREAM_BIT_LEN 0x02
#define QUIC_STREAM_BIT_FIN 0x01
#define QUIC_FRAME_MAX_DATA 0x10
#define QUIC_FRAME_MAX_STREAM_DATA 0x11
#define QUIC_FRAME_MAX_STREAMS_BIDI 0x12
#define QUIC_FRAME_MAX_STREAMS_UNI 0x13
#define QUIC_FRAME_DATA_BLOCKED 0x14
#define QUIC_FRAME_STREAM_DATA_BLOCKED 0x15
#define QUIC_FRAME_STREAMS_BLOCKED_BIDI 0x16
#define QUIC_FRAME_STREAMS_BLOCKED_UNI 0x17
#define QUIC_FRAME_NEW_CONNECTION_ID 0x18
#define QUIC_FRAME_RETIRE_CONNECTION_ID 0x19
#define QUIC_FRAME_PATH_CHALLENGE 0x1a
#define QUIC_FRAME_PATH_RESPONSE 0x1b
#define QUIC_FRAME_CONNECTION_CLOSE 0x1c
#define QUIC_FRAME_CONNECTION_CLOSE_APP 0x1d
#define QUIC_FRAME_HANDSHAKE_DONE 0x1e
#define QUIC_FRAME_DATAGRAM 0x30		/* RFC 9221: no length, runs to the end */
#define QUIC_FRAME_DATAGRAM_LEN 0x31

/* Stream id kinds (RFC 9000 §2.1): low two bits. */
#define QUIC_SID_SERVER_UNI 0x3

/* --- network (precomputed in network order: no byte swaps per packet) ------------- */

#define BE_ETH_P_IP 0x0008		/* htons(0x0800) */
#define BE_ETH_P_IPV6 0xDD86		/* htons(0x86DD) */
#define FR_IPPROTO_UDP 17
#define FR_ETH_HLEN 14
#define FR_IPV4_HLEN 20			/* IPv4 with options goes up untouched */
#define FR_IPV6_HLEN 40			/* IPv6 with extension headers goes up untouched */
#define FR_UDP_HLEN 8

/* Pin a value in a register after its bounds check, so clang cannot hand the verifier an
 * unchecked copy (toolchain.md §9): check, barrier, check again. */
#define fr_barrier_var(x) asm volatile("" : "+r"(x))

#endif /* FASTRELAY_CONSTS_H */
