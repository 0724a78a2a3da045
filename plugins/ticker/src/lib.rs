//! `ticker`: a streaming plugin that emits `{"i": n}` for n in 0..count.
//!
//! It waits `interval_ms` between items, checks its cancellation token before
//! each one, and, given `fail_at`, fails after emitting that many items.

use std::time::Duration;

use etl_plugin::{
    export_plugin, schemars, Capabilities, Context, Emitter, Error, JsonSchema, StreamingPlugin,
};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
pub struct Input {
    count: i64,
    #[serde(default = "ten")]
    interval_ms: i64,
    #[serde(default)]
    fail_at: Option<i64>,
}

fn ten() -> i64 {
    10
}

#[derive(Serialize, JsonSchema)]
pub struct Item {
    i: i64,
}

pub struct Ticker;

impl StreamingPlugin for Ticker {
    type Input = Input;
    type Item = Item;
    const NAME: &'static str = "ticker";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const CAPABILITIES: Capabilities = Capabilities {
        cancellation: true,
        ..Capabilities::NONE
    };

    fn init(_config: &str) -> Result<Self, Error> {
        Ok(Ticker)
    }

    fn invoke(
        &self,
        input: Input,
        ctx: &mut Context,
        out: &mut Emitter<Item>,
    ) -> Result<(), Error> {
        let interval = Duration::from_millis(input.interval_ms.max(0) as u64);
        for i in 0..input.count {
            ctx.raise_if_cancelled()?;
            if input.fail_at == Some(i) {
                return Err(Error::new(format!("failed after {i} items")).with_type("TickerError"));
            }
            out.emit(&Item { i })?;
            if !interval.is_zero() {
                std::thread::sleep(interval);
            }
        }
        Ok(())
    }
}

export_plugin!(streaming Ticker);
