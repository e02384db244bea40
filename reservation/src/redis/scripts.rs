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

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("../../lua/common.lua"),
            include_str!(concat!("../../lua/", $file))
        ))
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
        }
    }
}

/// The source of the reserve script exactly as sent to Redis (for `SCRIPT LOAD` in
/// benchmarks and tools).
pub fn reserve_script_source() -> &'static str {
    concat!(
        include_str!("../../lua/common.lua"),
        include_str!("../../lua/reserve.lua")
    )
}
