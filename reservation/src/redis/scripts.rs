//! The Lua scripts, one per operation, each prefixed with `lua/common.lua`.
//!
//! Each script touches only the keys it is given in `KEYS`, all of them in the store's
//! namespace (one hash tag, one cluster slot). Confirm, release and expiry first read the
//! reservation's items, then call `settle` with their stock keys declared.
//!
//! `redis::Script` computes the SHA1 once; `invoke_async` calls `EVALSHA` and, on
//! `NOSCRIPT` (empty script cache after a restart or failover), loads the script and
//! calls it again.

use redis::Script;

/// A script's source as sent: `lua/common.lua`, then the script's own file.
macro_rules! source {
    ($file:literal) => {
        concat!(
            include_str!("../../lua/common.lua"),
            include_str!(concat!("../../lua/", $file))
        )
    };
}

macro_rules! script {
    ($file:literal) => {
        Script::new(source!($file))
    };
}

/// Every script of the crate.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) reserve: Script,
    pub(crate) settle: Script,
    pub(crate) due: Script,
    pub(crate) set_stock: Script,
    pub(crate) adjust_stock: Script,
    pub(crate) reservation: Script,
    /// Several reserve / settle calls in one invocation (coalescing).
    pub(crate) batch: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            reserve: script!("reserve.lua"),
            settle: script!("settle.lua"),
            due: script!("due.lua"),
            set_stock: script!("set_stock.lua"),
            adjust_stock: script!("adjust_stock.lua"),
            reservation: script!("reservation.lua"),
            batch: script!("batch.lua"),
        }
    }
}

/// The source of the reserve script exactly as sent to Redis (for `SCRIPT LOAD` in
/// benchmarks and tools).
pub fn reserve_script_source() -> &'static str {
    source!("reserve.lua")
}

/// The source of the batch script (`lua/batch.lua`: its wire format is described at its
/// top) exactly as sent to Redis, for tools and tests that call it directly.
pub fn batch_script_source() -> &'static str {
    source!("batch.lua")
}

#[cfg(test)]
mod tests {
    /// Every script file, as sent (each prefixed with `common.lua`).
    const SOURCES: [(&str, &str); 8] = [
        ("common.lua", include_str!("../../lua/common.lua")),
        ("reserve.lua", include_str!("../../lua/reserve.lua")),
        ("settle.lua", include_str!("../../lua/settle.lua")),
        ("due.lua", include_str!("../../lua/due.lua")),
        ("set_stock.lua", include_str!("../../lua/set_stock.lua")),
        (
            "adjust_stock.lua",
            include_str!("../../lua/adjust_stock.lua"),
        ),
        ("reservation.lua", include_str!("../../lua/reservation.lua")),
        ("batch.lua", include_str!("../../lua/batch.lua")),
    ];
    /// Names the scripts give to keys; each must be bound from `KEYS` only.
    const KEY_NAMES: [&str; 5] = ["key", "res_key", "expiries_key", "holds_key", "m[1]"];
    /// Tables of keys batch.lua passes to bulk commands (`MGET`, `EXISTS`, `MSET`): `KEYS`
    /// itself (a slice of it), or a table filled only with names from [`KEY_NAMES`] (and,
    /// for `MSET`, their values).
    const KEY_TABLES: [&str; 2] = ["KEYS", "held"];

    /// The strings scripts build by concatenation, all values (an index member, a
    /// record), never keys.
    const VALUES_BUILT: [&str; 2] = ["return '\\0' .. table.concat(ids", "= 'held:' .."];

    /// A static check next to the cluster test (tests/cluster_migration.rs): the key of
    /// every `redis.call` is `KEYS[..]` or a name bound from `KEYS`, and no script builds
    /// a key by concatenation (the one `..` on a prefix only compares declared keys).
    #[test]
    fn scripts_touch_only_declared_keys() {
        for (file, source) in SOURCES {
            for (n, line) in source.lines().enumerate() {
                let code = line.split("--").next().unwrap_or_default().trim();
                let at = format!("{file}:{}: {code}", n + 1);
                if let Some(call) = code.split("redis.call(").nth(1) {
                    let args: Vec<&str> = call.split(", ").map(str::trim).collect();
                    if args[0] != "'TIME')" {
                        let key = args.get(1).copied().unwrap_or_default();
                        // A key given last: `redis.call(..., key))`.
                        let key = key.trim_end_matches(')');
                        let table = key
                            .strip_prefix("unpack(")
                            .is_some_and(|t| KEY_TABLES.contains(&t));
                        assert!(
                            key.starts_with("KEYS[") || KEY_NAMES.contains(&key) || table,
                            "undeclared key argument {key:?} at {at}"
                        );
                    }
                }
                if let Some(binding) = code.strip_prefix("local ") {
                    if let Some((names, values)) = binding.split_once(" = ") {
                        for (name, value) in names.split(", ").zip(values.split(", ")) {
                            if KEY_NAMES.contains(&name) {
                                assert!(value.starts_with("KEYS["), "{name} not from KEYS at {at}");
                            }
                        }
                    }
                }
                for table in KEY_TABLES {
                    if let Some(value) = code
                        .strip_prefix(&format!("{table}[#{table} + 1] = "))
                        .filter(|v| !v.starts_with("records["))
                    {
                        assert!(KEY_NAMES.contains(&value), "{table} fed {value:?} at {at}");
                    }
                }
                if code.contains(" .. ") {
                    assert!(
                        code.contains("~= stock_prefix ..")
                            || VALUES_BUILT.iter().any(|value| code.contains(value)),
                        "string built at {at}"
                    );
                }
            }
        }
    }
}
