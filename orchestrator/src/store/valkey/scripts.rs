//! The Lua scripts: each operation that must be atomic is one script on one slot. Each lives in
//! its own file under `lua/`; the record scripts get the layout constants from a prelude
//! rendered from `record.rs`, then the shared helpers of `lua/record.lua`, so no script spells
//! out an offset of its own (see `docs/valkey-store.md`).

use std::sync::LazyLock;

use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::LuaInterface;
use fred::types::Value;
use tokio::sync::OnceCell;

use servicekit::protocol::HealthStatus;

use super::record::{status_letter, CHECK_TAG, HEADER_LEN, HEALTH_TAG, PING_OFFSET, STAMP_DIGITS};

/// The helpers for the record layout that every record script uses.
const RECORD_LUA: &str = include_str!("lua/record.lua");

/// The layout constants as Lua locals, rendered from the Rust ones.
fn layout_prelude() -> String {
    let [health, check, passing] =
        [HEALTH_TAG, CHECK_TAG, status_letter(HealthStatus::Passing)].map(char::from);
    format!(
        "local STAMP_DIGITS, HEADER_LEN, PING_OFFSET = {STAMP_DIGITS}, {HEADER_LEN}, {PING_OFFSET}\n\
         local HEALTH_TAG, CHECK_TAG, PASSING = '{health}', '{check}', '{passing}'\n"
    )
}

/// A script on records: the layout prelude, the record helpers, then `body`.
fn record_script(body: &str) -> LuaScript {
    LuaScript::new(format!("{}{RECORD_LUA}{body}", layout_prelude()))
}

/// See `lua/register.lua` for its KEYS, ARGV and reply.
pub(super) static REGISTER: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/register.lua")));
/// See `lua/ping.lua`.
pub(super) static PING: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/ping.lua")));
/// See `lua/deregister.lua`.
pub(super) static DEREGISTER: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/deregister.lua")));
/// See `lua/announce.lua`: logs `registered` / `updated`.
pub(super) static ANNOUNCE: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/announce.lua")));
/// See `lua/deregistered.lua`: logs `deregistered`.
pub(super) static DEREGISTERED: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/deregistered.lua")));
/// See `lua/reap.lua`: drops gone all-index entries and logs `expired`.
pub(super) static REAP: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/reap.lua")));
/// See `lua/health.lua`.
pub(super) static HEALTH: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/health.lua")));
/// See `lua/health_logged.lua`.
pub(super) static HEALTH_LOGGED: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/health_logged.lua")));
/// See `lua/checkers.lua`.
pub(super) static CHECKERS: LazyLock<LuaScript> =
    LazyLock::new(|| record_script(include_str!("lua/checkers.lua")));
/// See `lua/log_read.lua`.
pub(super) static LOG_READ: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("lua/log_read.lua").to_owned()));
/// See `lua/index_drop.lua`.
pub(super) static INDEX_DROP: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("lua/index_drop.lua").to_owned()));

/// A Lua script run with `EVALSHA`, loaded on first use and re-sent with `EVAL` whenever a
/// node answers `NOSCRIPT` (a restarted server, another Cluster node, a promoted replica).
///
/// Not fred's `Script::evalsha_with_reload`: on `NOSCRIPT` it runs `SCRIPT LOAD` on every
/// Cluster primary from inside the client's router, which first drains every connection and,
/// if any one primary fails, disconnects the whole client. `EVAL` touches only the node that
/// needs the script, in one round trip.
#[derive(Debug)]
pub(super) struct LuaScript {
    lua: String,
    sha: OnceCell<String>,
}

impl LuaScript {
    fn new(lua: String) -> Self {
        LuaScript {
            lua,
            sha: OnceCell::const_new(),
        }
    }

    /// The whole script text, as sent to Valkey.
    pub(super) fn lua(&self) -> &str {
        &self.lua
    }

    pub(super) async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, FredError> {
        let sha = self
            .sha
            .get_or_try_init(|| async { client.script_load::<String, _>(self.lua.as_str()).await })
            .await?;
        match client
            .evalsha::<Value, _, _, _>(sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                client
                    .eval::<Value, _, _, _>(self.lua.as_str(), keys, args)
                    .await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_scripts_are_prelude_then_helpers_then_body() {
        for (script, body) in [
            (&*REGISTER, include_str!("lua/register.lua")),
            (&*PING, include_str!("lua/ping.lua")),
            (&*DEREGISTER, include_str!("lua/deregister.lua")),
            (&*ANNOUNCE, include_str!("lua/announce.lua")),
            (&*DEREGISTERED, include_str!("lua/deregistered.lua")),
            (&*REAP, include_str!("lua/reap.lua")),
            (&*HEALTH, include_str!("lua/health.lua")),
            (&*HEALTH_LOGGED, include_str!("lua/health_logged.lua")),
            (&*CHECKERS, include_str!("lua/checkers.lua")),
        ] {
            let expected = format!("{}{RECORD_LUA}{body}", layout_prelude());
            assert_eq!(script.lua(), expected);
        }
        assert!(
            layout_prelude().contains(&format!(" = {STAMP_DIGITS}, {HEADER_LEN}, {PING_OFFSET}\n"))
        );
        assert!(layout_prelude().ends_with(" = 'h', 'c', 'p'\n"));
    }
}
