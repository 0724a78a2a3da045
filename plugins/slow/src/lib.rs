//! `slow`: sleeps `unit_ms` per unit of work, for shutdown tests and demos.
//!
//! When `cooperative` (the default) it checks its cancellation token between
//! units and bails out with a shutdown-abort; otherwise it ignores the token
//! and runs every unit, like a plugin written before cancellation existed.
//! It records the units it completed as usage `units_done` either way, so a
//! caller can see how far it got.

use std::time::Duration;

use etl_plugin::{export_plugin, schemars, Capabilities, Context, Error, JsonSchema, Plugin};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
pub struct Input {
    units: i64,
    #[serde(default = "ten")]
    unit_ms: i64,
    #[serde(default = "yes")]
    cooperative: bool,
}

fn ten() -> i64 {
    10
}

fn yes() -> bool {
    true
}

#[derive(Serialize, JsonSchema)]
pub struct Output {
    done: i64,
}

pub struct Slow;

impl Plugin for Slow {
    type Input = Input;
    type Output = Output;
    const NAME: &'static str = "slow";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const CAPABILITIES: Capabilities = Capabilities {
        usage: true,
        cancellation: true,
        ..Capabilities::NONE
    };

    fn init(_config: &str) -> Result<Self, Error> {
        Ok(Slow)
    }

    fn invoke(&self, input: Input, ctx: &mut Context) -> Result<Output, Error> {
        let unit = Duration::from_millis(input.unit_ms.max(0) as u64);
        let mut done = 0;
        while done < input.units {
            if input.cooperative && ctx.is_cancelled() {
                ctx.add_usage("units_done", done);
                ctx.info(format!("cancelled after {done} of {} units", input.units));
                return Err(Error::shutdown());
            }
            std::thread::sleep(unit);
            done += 1;
        }
        ctx.add_usage("units_done", done);
        Ok(Output { done })
    }
}

export_plugin!(Slow);
