/* shim_structs.h: layouts the `soft` crypto shim (crypto_shim.c) shares with
 * crypto_backends/soft_shim.py.
 *
 * soft_shim.py mirrors every struct and constant here with ctypes, and
 * tests/kernel/test_crypto_shim_structs.py checks that the two agree field by field:
 * change both together.
 */
#ifndef FASTRELAY_SHIM_STRUCTS_H
#define FASTRELAY_SHIM_STRUCTS_H

/* Connections (entries per direction) the shim can hold keys for. */
#ifndef SHIM_MAX_CONNS
#define SHIM_MAX_CONNS 8192
#endif

/* Longest destination connection id (RFC 9000 §17.2), bytes. */
#define SHIM_MAX_CID_LEN 20

/* shim_conn_key.direction: which of the connection's directions the entry protects. */
#define SHIM_DIR_RECV 0		/* ingress: unprotect, verify, write the token */
#define SHIM_DIR_SEND 1		/* egress: protect */

/* shim_conn.state: how the connection's 1-RTT packets are protected. */
#define SHIM_STATE_PASS 0	/* by userspace (aioquic): the shim leaves them untouched */
#define SHIM_STATE_NO_KEYS 1	/* offloaded, keys not installed yet: egress drops, ingress hands up */
#define SHIM_STATE_KEYS 2	/* offloaded with keys */

/* shim_conn.flags */
#define SHIM_CONN_FASTPATH 0x1	/* the fast path holds the connection as fr_conns[fr_conn_idx] */

/* One direction of one connection, found by its addresses and UDP ports as seen from
 * the relay (so peers with zero-length connection ids are found too). IPv4 addresses
 * are IPv4-mapped (::ffff:a.b.c.d); ports in network byte order. */
struct shim_conn_key {
	__u8 local_addr[16];
	__u8 peer_addr[16];
	__u16 local_port;
	__u16 peer_port;
	__u32 direction;	/* SHIM_DIR_* */
};

/* Keys of one key phase (RFC 9001 §5.1): AEAD key and IV. */
struct shim_phase_keys {
	__u8 key[32];
	__u8 iv[12];
	__u32 valid;		/* 0: no keys for this phase, packets with its key-phase bit are dropped */
};

/* shim_conn.phase[]: slots 0 and 1 are indexed by the key-phase bit (the current phase
 * and the next one); this one holds the receive direction's previous phase (RFC 9001
 * §6.5), whose bit is the next phase's: a packet of the other bit uses it when its number
 * is lower than the first one received in the current phase. */
#define SHIM_PHASE_PREVIOUS 2

/* One direction of one connection: written by userspace, next_pn and phase_first_pn also
 * by the shim (userspace carries both over when it rewrites the entry). */
struct shim_conn {
	__u32 state;		/* SHIM_STATE_* */
	__u32 dcid_len;		/* length of the short header's destination CID in this direction */
	__u8 hp_key[32];	/* header protection key (never changes with key updates) */
	struct shim_phase_keys phase[3];	/* [0], [1] by key-phase bit; [SHIM_PHASE_PREVIOUS]
						 * receive only, valid after a key update until
						 * the next one replaces it */
	__u64 next_pn;		/* largest packet number seen in this direction plus one (0: none) */
	__u32 flags;		/* SHIM_CONN_* */
	__u32 fr_conn_idx;	/* with SHIM_CONN_FASTPATH: the fast path's connection index, written
				 * into the ingress verdict (structs.h) and checked against the
				 * egress one */
	__u64 phase_first_pn[2];	/* receive, by key-phase bit: the lowest packet number
					 * verified with phase[bit]'s keys since they were
					 * installed, plus one (0: none yet) */
	__u32 current_phase;	/* key-phase bit of the current phase */
	__u32 pad;
	__u8 reset_token[16];	/* SHIM_DIR_RECV: the peer's stateless reset token for the
				 * connection id in use (RFC 9000 §10.3); all zero: none. A
				 * datagram that does not decrypt but ends in it is passed up. */
};

/* Global settings, one element. */
struct shim_config {
	__u8 token[16];		/* per-boot verification token written into verified tag slots */
};

/* Counters, per CPU (sum over CPUs). Bytes are frame lengths. Every packet is counted
 * once in *_packets and once in exactly one of the verdict fields below it. */
struct shim_stats {
	__u64 ingress_packets;
	__u64 ingress_bytes;
	__u64 ingress_passed;		/* not 1-RTT QUIC of a known connection, or state PASS */
	__u64 ingress_decrypted;	/* tag verified, token written (and the fast path's
					 * verdict, with SHIM_CONN_FASTPATH) */
	__u64 ingress_no_keys;		/* offloaded connection without keys: handed up encrypted */
	__u64 ingress_too_long;		/* longer than the shim handles: handed up encrypted */
	__u64 ingress_gso;		/* a GRO/GSO super-packet: handed up encrypted */
	__u64 ingress_drop_too_short;	/* cannot be sampled (RFC 9001 §5.4.2) */
	__u64 ingress_drop_bad_tag;	/* tag did not verify */
	__u64 ingress_drop_no_phase;	/* key-phase bit names a phase without keys */
	__u64 ingress_drop_error;	/* a helper failed */
	__u64 egress_packets;
	__u64 egress_bytes;
	__u64 egress_passed;		/* not 1-RTT QUIC of a known connection, or state PASS */
	__u64 egress_encrypted;
	__u64 egress_drop_no_keys;	/* offloaded connection without keys, or a packet the fast
					 * path marked for protection that the shim holds no
					 * keys for: never sent in plaintext */
	__u64 egress_drop_too_short;	/* cannot be sampled (RFC 9001 §5.4.2) */
	__u64 egress_drop_too_long;	/* longer than the shim handles */
	__u64 egress_drop_gso;		/* a GSO super-packet: one header, many QUIC packets */
	__u64 egress_drop_no_phase;	/* key-phase bit names a phase without keys */
	__u64 egress_drop_error;	/* a helper failed */
	__u64 egress_drop_wrong_conn;	/* the fast path's verdict names another connection */
	/* Not verdicts: of the packets verified / protected above, those in key phase 1 (a key
	 * update took place in that direction on the wire). */
	__u64 ingress_key_phase_1;
	__u64 egress_key_phase_1;
	/* Not a verdict: of ingress_decrypted, those verified with the previous phase's keys
	 * (sent before the peer followed a key update, or reordered across one). */
	__u64 ingress_previous_phase;
	/* An ingress verdict (kept here, after the others, so the layout only grows): did not
	 * decrypt but ends in the connection's stateless reset token: handed up unchanged,
	 * without a verdict for the fast path. */
	__u64 ingress_stateless_reset;
};

#endif /* FASTRELAY_SHIM_STRUCTS_H */
