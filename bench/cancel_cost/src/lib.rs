//! `cancel_cost`, a benchmark-only plugin: it calls `Context::is_cancelled`
//! `calls` times in a loop and reports how long that took, and how long the
//! same loop takes over a plain local atomic, so the benchmark can report
//! the cost of a cancellation check as the plugin sees it, next to the
//! cheapest check there could be.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use etl_plugin::{export_plugin, Capabilities, Context, Error, JsonSchema, Plugin};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
pub struct Input {
    calls: i64,
}

#[derive(Serialize, JsonSchema)]
pub struct Output {
    calls: i64,
    /// Nanoseconds for `calls` checks through the context.
    token_ns: i64,
    /// Nanoseconds for `calls` acquire loads of a local atomic.
    atomic_ns: i64,
    /// How many checks saw the flag set.
    cancelled: i64,
}

pub struct CancelCost;

impl Plugin for CancelCost {
    type Input = Input;
    type Output = Output;
    const NAME: &'static str = "cancel_cost";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const CAPABILITIES: Capabilities = Capabilities {
        cancellation: true,
        ..Capabilities::NONE
    };

    fn init(_config: &str) -> Result<Self, Error> {
        Ok(CancelCost)
    }

    fn invoke(&self, input: Input, ctx: &mut Context) -> Result<Output, Error> {
        let calls = input.calls.max(0);
        let mut cancelled = 0;
        let started = Instant::now();
        for _ in 0..calls {
            cancelled += i64::from(black_box(&*ctx).is_cancelled());
        }
        let token_ns = started.elapsed().as_nanos() as i64;

        let local = AtomicU32::new(0);
        let mut set = 0;
        let started = Instant::now();
        for _ in 0..calls {
            set += i64::from(black_box(&local).load(Ordering::Acquire) != 0);
        }
        let atomic_ns = started.elapsed().as_nanos() as i64;
        black_box(set);

        Ok(Output {
            calls,
            token_ns,
            atomic_ns,
            cancelled,
        })
    }
}

export_plugin!(CancelCost);
