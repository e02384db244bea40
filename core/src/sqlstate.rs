//! Which PostgreSQL errors are worth retrying: one classification for every crate.
//!
//! A retryable error is one where running the same transaction again, later, may succeed:
//! the relay then backs off instead of parking, the consumer runtime retries the event
//! instead of dead-lettering it, and a caller of `is_retryable()` on any crate's error
//! retries instead of giving up. Getting it wrong costs differently in each direction: a
//! transient error taken as permanent dead-letters (or parks) a good event; a permanent one
//! taken as transient retries a hopeless event until its attempt limit. So the list is
//! explicit: only the SQLSTATEs below are retryable, every other code (and an error with no
//! code) is permanent.
//!
//! | class | name | retryable | why |
//! |---|---|---|---|
//! | `08` | connection exception | every code | the connection was lost or refused; a new one may work |
//! | `25` | invalid transaction state | `25P03` idle_in_transaction_session_timeout, `25P04` transaction_timeout | the server ended the session or transaction on a timer; a fresh try may finish in time. The other codes are client bugs |
//! | `40` | transaction rollback | `40001` serialization_failure, `40P01` deadlock_detected | the textbook retry cases. Not `40000` (unspecified), `40002` (a constraint failed at commit: the same data fails again), `40003` (statement completion unknown: it may have taken effect) |
//! | `53` | insufficient resources | every code: `53000`, `53100` disk_full, `53200` out_of_memory, `53300` too_many_connections, `53400` configuration_limit_exceeded | resources free up again |
//! | `55` | object not in prerequisite state | `55P03` lock_not_available | a `lock_timeout` or `NOWAIT` lock; the holder finishes. Not `55000`, `55006` object_in_use |
//! | `57` | operator intervention | `57014` query_canceled (`statement_timeout`), `57P01` admin_shutdown, `57P02` crash_shutdown, `57P03` cannot_connect_now, `57P05` idle_session_timeout | a timeout, a restart or a recovery in progress. Not `57000`, `57P04` database_dropped |
//! | `72` | snapshot failure | `72000` snapshot_too_old | a new transaction takes a new snapshot |
//! | any other | `0A` feature not supported, `22` data exception, `23` integrity constraint violation, `42` syntax error or access rule violation, `54` program limit exceeded, `58` system error, `F0`, `HV`, `P0` PL/pgSQL (`P0001` raise_exception), `XX` internal error, … | none | the same statement fails the same way again |
//!
//! ```
//! use eventful_core::sqlstate::is_retryable_sqlstate;
//!
//! assert!(is_retryable_sqlstate("40001")); // serialization_failure
//! assert!(is_retryable_sqlstate("53300")); // too_many_connections
//! assert!(!is_retryable_sqlstate("23505")); // unique_violation
//! ```

/// `true` when a PostgreSQL error with SQLSTATE `code` may succeed if the transaction is run
/// again later (see the [module docs](self) for the table and the reasons); `false` for
/// every other code, including an empty or malformed one.
pub fn is_retryable_sqlstate(code: &str) -> bool {
    if code.len() != 5 || !code.is_ascii() {
        return false;
    }
    let class = &code[..2];
    matches!(class, "08" | "53")
        || matches!(
            code,
            "25P03" // idle_in_transaction_session_timeout
                | "25P04" // transaction_timeout
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available (lock_timeout, NOWAIT)
                | "57014" // query_canceled (statement_timeout)
                | "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, recovery)
                | "57P05" // idle_session_timeout
                | "72000" // snapshot_too_old
        )
}

/// `true` when the operation that failed with `error` may succeed if run again later (in a
/// new transaction).
///
/// - A database error: by its SQLSTATE, [`is_retryable_sqlstate`]; none is permanent.
/// - I/O, TLS and protocol errors, a pool timeout, a crashed connection worker: retryable
///   (the connection or the network failed, not the statement).
/// - A closed pool: retryable. It happens while the application shuts down, when a
///   permanent verdict would dead-letter or park a good event; the retry loop ends with the
///   shutdown instead.
/// - A `sqlx::Error::Migrate` (only an application's own sqlx migrator raises it; the
///   Eventful crates use [`crate::migrate`], whose
///   [`MigrateError::is_retryable`](crate::migrate::MigrateError::is_retryable)
///   classifies its own errors): permanent.
/// - Everything else (configuration, encode/decode, row or column not found, …): permanent.
#[cfg(feature = "sqlx")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_retryable_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agreed classification. Against the code before `eventful-core`, the idempotency
    /// crate's `sqlx_is_retryable` (everything but classes 22, 23, 42) got "", 0A000, 25001,
    /// 40000, 40002, 40003, 54000, 55000, 55006, 57000, 57P04, 58030, P0001, XX000 and
    /// XX001 wrong; the outbox's `sqlstate_is_retryable` got 25P03, 25P04 and 72000 wrong.
    const TABLE: &[(&str, bool)] = &[
        ("08000", true),
        ("08001", true),
        ("08003", true),
        ("08004", true),
        ("08006", true),
        ("08P01", true),
        ("25P03", true),
        ("25P04", true),
        ("40001", true),
        ("40P01", true),
        ("53000", true),
        ("53100", true),
        ("53200", true),
        ("53300", true),
        ("53400", true),
        ("55P03", true),
        ("57014", true),
        ("57P01", true),
        ("57P02", true),
        ("57P03", true),
        ("57P05", true),
        ("72000", true),
        ("", false),
        ("08", false),
        ("0A000", false),
        ("22001", false),
        ("22P02", false),
        ("23505", false),
        ("23503", false),
        ("25001", false),
        ("40000", false),
        ("40002", false),
        ("40003", false),
        ("42601", false),
        ("42P01", false),
        ("42703", false),
        ("54000", false),
        ("55000", false),
        ("55006", false),
        ("57000", false),
        ("57P04", false),
        ("58030", false),
        ("P0001", false),
        ("XX000", false),
        ("XX001", false),
    ];

    #[test]
    fn sqlstate_table() {
        let wrong: Vec<_> = TABLE
            .iter()
            .filter(|(code, retryable)| is_retryable_sqlstate(code) != *retryable)
            .collect();
        assert!(
            wrong.is_empty(),
            "misclassified SQLSTATEs (code, expected): {wrong:?}"
        );
    }

    #[test]
    fn non_ascii_input_is_permanent_not_a_panic() {
        assert!(!is_retryable_sqlstate("é0001"));
        assert!(!is_retryable_sqlstate("0é001"));
        assert!(!is_retryable_sqlstate("0é00"));
    }

    #[cfg(feature = "sqlx")]
    mod sqlx_errors {
        use std::borrow::Cow;

        use super::super::is_retryable;
        use super::TABLE;

        /// A database error carrying a chosen SQLSTATE (an empty one stands for "no code").
        #[derive(Debug)]
        struct Coded(&'static str);

        impl std::fmt::Display for Coded {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "SQLSTATE {}", self.0)
            }
        }

        impl std::error::Error for Coded {}

        impl sqlx::error::DatabaseError for Coded {
            fn message(&self) -> &str {
                self.0
            }
            fn code(&self) -> Option<Cow<'_, str>> {
                (!self.0.is_empty()).then_some(Cow::Borrowed(self.0))
            }
            fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
                self
            }
            fn kind(&self) -> sqlx::error::ErrorKind {
                sqlx::error::ErrorKind::Other
            }
        }

        fn database(code: &'static str) -> sqlx::Error {
            sqlx::Error::Database(Box::new(Coded(code)))
        }

        #[test]
        fn database_errors_follow_the_sqlstate_table() {
            let wrong: Vec<_> = TABLE
                .iter()
                .filter(|(code, retryable)| is_retryable(&database(code)) != *retryable)
                .collect();
            assert!(
                wrong.is_empty(),
                "misclassified SQLSTATEs (code, expected): {wrong:?}"
            );
        }

        #[test]
        fn connection_and_pool_errors_are_retryable_the_rest_permanent() {
            let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
            let table: Vec<(&str, sqlx::Error, bool)> = vec![
                ("io", sqlx::Error::Io(io()), true),
                ("tls", sqlx::Error::Tls(Box::new(io())), true),
                ("protocol", sqlx::Error::Protocol("unexpected".into()), true),
                ("pool timed out", sqlx::Error::PoolTimedOut, true),
                ("pool closed", sqlx::Error::PoolClosed, true),
                ("worker crashed", sqlx::Error::WorkerCrashed, true),
                ("row not found", sqlx::Error::RowNotFound, false),
                (
                    "configuration",
                    sqlx::Error::Configuration("bad url".into()),
                    false,
                ),
                ("decode", sqlx::Error::Decode("bad".into()), false),
                ("encode", sqlx::Error::Encode("bad".into()), false),
                (
                    "column not found",
                    sqlx::Error::ColumnNotFound("x".into()),
                    false,
                ),
                ("begin failed", sqlx::Error::BeginFailed, false),
            ];
            let wrong: Vec<_> = table
                .iter()
                .filter(|(_, error, retryable)| is_retryable(error) != *retryable)
                .map(|(name, _, retryable)| (name, retryable))
                .collect();
            assert!(
                wrong.is_empty(),
                "misclassified sqlx errors (name, expected): {wrong:?}"
            );
        }
    }
}
