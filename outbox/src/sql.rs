//! SQL text for one outbox table, built once from its (validated) schema and table names.

/// Number of key-hash partitions: the unit of relay ownership. Fixed by the schema (the
/// migration creates one lease row per partition), so every process agrees on it.
pub(crate) const PARTITIONS: i32 = 64;

/// FNV-1a, 64 bit: a stable hash (the same in every process and release).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) channel: String,
    lock_prefix: Vec<u8>,
    /// Where releases before the shared migrator recorded versions (adopted, then dropped).
    pub(crate) migrations_table: String,
    pub(crate) lock_keys_and_notify: String,
    pub(crate) lock_keys: String,
    pub(crate) insert: String,
    pub(crate) stats: String,
    pub(crate) status: String,
    pub(crate) parked: String,
    pub(crate) redrive: String,
    pub(crate) redrive_all: String,
    pub(crate) delete_published: String,
    // Relay.
    pub(crate) register: String,
    pub(crate) deregister: String,
    pub(crate) prune_relays: String,
    pub(crate) live_relays: String,
    pub(crate) renew: String,
    pub(crate) held: String,
    pub(crate) claim: String,
    pub(crate) release_some: String,
    pub(crate) release_all: String,
    pub(crate) fetch: String,
    pub(crate) mark_published: String,
    pub(crate) mark_failed: String,
    // Slot rotation (migration 0003).
    pub(crate) rotation_state: String,
    pub(crate) lock_slot_state: String,
    pub(crate) unpublished_in_slot: [String; 2],
    pub(crate) lock_slot: [String; 2],
    pub(crate) carry_over: [String; 2],
    pub(crate) truncate_slot: [String; 2],
    pub(crate) switch_slot: String,
}

impl Sql {
    pub(crate) fn new(schema: &str, table: &str) -> Sql {
        let t = format!("\"{schema}\".\"{table}\"");
        let leases = format!("\"{schema}\".\"{table}_leases\"");
        let relays = format!("\"{schema}\".\"{table}_relays\"");
        let slot_state = format!("\"{schema}\".\"{table}_slot\"");
        let seq = format!("\"{schema}\".\"{table}_seq_seq\"");
        let slot = |n: i32| format!("\"{schema}\".\"{table}_slot{n}\"");
        // The sequence is read in a subquery so that `lock_slot_state` can lock the slot row
        // (`FOR UPDATE` refuses a sequence in the FROM list).
        let rotation_state = format!(
            "SELECT s.current, s.since_seq, (SELECT last_value FROM {seq}) AS last_value \
             FROM {slot_state} s"
        );
        let columns =
            "seq, id, topic, key, partition, event_type, payload, content_type, headers, \
                       created_at, published_at, attempts, last_error, next_attempt_at, parked_at";
        let channel = format!(
            "eventful_outbox_{:016x}",
            fnv1a64(format!("{schema}.{table}").as_bytes())
        );
        let mut lock_prefix = format!("{schema}.{table}").into_bytes();
        lock_prefix.push(0);
        Sql {
            schema: schema.to_owned(),
            table: table.to_owned(),
            channel,
            lock_prefix,
            migrations_table: format!("\"{schema}\".\"{table}_migrations\""),
            lock_keys_and_notify: "SELECT pg_notify($2, '') FROM \
                 (SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k) AS locked"
                .to_owned(),
            lock_keys: "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k"
                .to_owned(),
            // Into the current slot, read once per statement (the column's default,
            // `<table>_current_slot()`, is for other writers: a function call per row). A
            // writer whose snapshot predates a rotation may still write to the slot that
            // stopped being current: that is safe, the slot is only emptied once every writer
            // that holds a lock on it has committed (see `rotate`).
            insert: format!(
                "INSERT INTO {t} (id, topic, key, partition, event_type, payload, content_type, headers, slot) \
                 SELECT u.id, u.topic, u.key, u.partition, u.event_type, u.payload, u.content_type, \
                        u.headers::jsonb, s.current \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::bytea[], \
                             $7::text[], $8::text[]) WITH ORDINALITY \
                   AS u(id, topic, key, partition, event_type, payload, content_type, headers, ord) \
                 CROSS JOIN {slot_state} s \
                 ORDER BY u.ord"
            ),
            stats: format!(
                "SELECT count(*) FILTER (WHERE parked_at IS NULL) AS pending, \
                        count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
                        (EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL)) \
                            * 1000)::float8 AS oldest_ms \
                 FROM {t} WHERE published_at IS NULL"
            ),
            status: format!(
                "SELECT attempts, published_at, parked_at, last_error FROM {t} WHERE id = $1"
            ),
            parked: format!(
                "SELECT id, seq, topic, key, event_type, attempts, last_error, created_at, parked_at \
                 FROM {t} WHERE parked_at IS NOT NULL AND published_at IS NULL ORDER BY seq LIMIT $1"
            ),
            redrive: format!(
                "WITH r AS (UPDATE {t} SET parked_at = NULL, attempts = 0, next_attempt_at = now() \
                            WHERE id = $1 AND parked_at IS NOT NULL AND published_at IS NULL \
                            RETURNING seq) \
                 SELECT pg_notify($2, '') FROM r"
            ),
            redrive_all: format!(
                "WITH r AS (UPDATE {t} SET parked_at = NULL, attempts = 0, next_attempt_at = now() \
                            WHERE parked_at IS NOT NULL AND published_at IS NULL RETURNING seq) \
                 SELECT pg_notify($1, '') FROM r"
            ),
            delete_published: format!(
                "DELETE FROM {t} WHERE seq IN \
                   (SELECT seq FROM {t} \
                    WHERE published_at < now() - $1::float8 * interval '1 millisecond' \
                    ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            register: format!(
                "INSERT INTO {relays} (relay_id) VALUES ($1) \
                 ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now()"
            ),
            deregister: format!("DELETE FROM {relays} WHERE relay_id = $1"),
            prune_relays: format!(
                "DELETE FROM {relays} WHERE heartbeat_at < now() - $1::float8 * interval '1 millisecond'"
            ),
            live_relays: format!(
                "SELECT count(*) FROM {relays} \
                 WHERE heartbeat_at > now() - $1::float8 * interval '1 millisecond'"
            ),
            renew: format!(
                "UPDATE {leases} SET expires_at = now() + $2::float8 * interval '1 millisecond' \
                 WHERE owner = $1 RETURNING partition"
            ),
            held: format!(
                "SELECT count(*) FROM {leases} WHERE owner = $1 AND expires_at > now()"
            ),
            claim: format!(
                "UPDATE {leases} SET owner = $1, epoch = epoch + 1, \
                        expires_at = now() + $2::float8 * interval '1 millisecond' \
                 WHERE partition IN \
                   (SELECT partition FROM {leases} \
                    WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= now() \
                    ORDER BY random() LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING partition"
            ),
            release_some: format!(
                "UPDATE {leases} SET owner = NULL, expires_at = NULL, epoch = epoch + 1 \
                 WHERE owner = $1 AND partition IN \
                   (SELECT partition FROM {leases} WHERE owner = $1 ORDER BY partition DESC LIMIT $2) \
                 RETURNING partition"
            ),
            release_all: format!(
                "UPDATE {leases} SET owner = NULL, expires_at = NULL, epoch = epoch + 1 WHERE owner = $1"
            ),
            // Pending rows of the partitions this relay holds (with at least $2 ms of lease
            // left), oldest first (`= ANY(ARRAY(..))` lets the planner walk the pending index
            // in seq order and stop at the limit instead of sorting every pending row),
            // excluding every row whose key has an earlier-or-same pending row that is parked
            // or waiting for its next attempt (head-of-key). The key is compared through its
            // hash first: that is what the index of failing rows holds (migration 0002). The
            // rows $4 (a batch being marked) and the keys $5 (its failed keys) are left out.
            fetch: format!(
                "SELECT o.seq, o.id, o.topic, o.key, o.event_type, o.payload, o.content_type, \
                        o.headers::text AS headers, o.created_at, o.attempts \
                 FROM {t} o \
                 WHERE o.published_at IS NULL \
                   AND o.seq <> ALL($4::bigint[]) AND o.key <> ALL($5::text[]) \
                   AND o.partition = ANY(ARRAY \
                     (SELECT l.partition FROM {leases} l \
                      WHERE l.owner = $1 AND l.expires_at > now() + $2::float8 * interval '1 millisecond')) \
                   AND NOT EXISTS \
                     (SELECT 1 FROM {t} b \
                      WHERE md5(b.key) = md5(o.key) AND b.key = o.key \
                        AND b.seq <= o.seq \
                        AND b.published_at IS NULL AND b.attempts > 0 \
                        AND (b.parked_at IS NOT NULL OR b.next_attempt_at > now())) \
                 ORDER BY o.seq \
                 LIMIT $3"
            ),
            mark_published: format!(
                "UPDATE {t} SET published_at = now() WHERE seq = ANY($1) AND published_at IS NULL"
            ),
            mark_failed: format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = u.err, \
                        next_attempt_at = now() + u.delay_ms * interval '1 millisecond', \
                        parked_at = CASE WHEN u.park THEN now() END \
                 FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[]) \
                   AS u(seq, err, delay_ms, park) \
                 WHERE o.seq = u.seq AND o.published_at IS NULL"
            ),
            lock_slot_state: format!("{rotation_state} FOR UPDATE NOWAIT"),
            rotation_state,
            unpublished_in_slot: [0, 1].map(|n| {
                format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {} WHERE published_at IS NULL LIMIT $1) AS u",
                    slot(n)
                )
            }),
            lock_slot: [0, 1].map(|n| format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", slot(n))),
            // The unpublished rows of the slot about to be emptied move to the other slot
            // as they are: same seq (so the same order), attempts, retry time and parking.
            carry_over: [0, 1].map(|n| {
                format!(
                    "INSERT INTO {t} ({columns}, slot) SELECT {columns}, {} FROM {} \
                     WHERE published_at IS NULL",
                    1 - n,
                    slot(n)
                )
            }),
            truncate_slot: [0, 1].map(|n| format!("TRUNCATE {}", slot(n))),
            switch_slot: format!(
                "UPDATE {slot_state} SET current = $1, since_seq = $2, rotated_at = now(), \
                        rotations = rotations + 1"
            ),
        }
    }

    /// The advisory-lock id of `key` in this table.
    pub(crate) fn key_lock(&self, key: &str) -> i64 {
        let mut bytes = self.lock_prefix.clone();
        bytes.extend_from_slice(key.as_bytes());
        fnv1a64(&bytes) as i64
    }

    /// A migration file with the placeholders substituted.
    pub(crate) fn render(&self, template: &str) -> String {
        template
            .replace("{schema}", &self.schema)
            .replace("{table}", &self.table)
            .replace("{partitions}", &PARTITIONS.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn key_locks_differ_per_table() {
        let a = Sql::new("public", "a");
        let b = Sql::new("public", "b");
        assert_eq!(a.key_lock("k"), a.key_lock("k"));
        assert_ne!(a.key_lock("k"), b.key_lock("k"));
        assert_ne!(a.key_lock("k1"), a.key_lock("k2"));
    }

    #[test]
    fn render_substitutes_every_placeholder() {
        let sql = Sql::new("orders", "outbox");
        let out = sql.render(include_str!("../migrations/0001_outbox.sql"));
        assert!(!out.contains('{') || !out.contains("{table}"));
        assert!(out.contains("\"orders\".\"outbox_leases\""));
        assert!(out.contains("generate_series(0, 64 - 1)"));
    }
}
