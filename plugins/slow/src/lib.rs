//! `slow`: sleeps `unit_ms` per unit of work, for shutdown tests and demos.
//!
//! When `cooperative` (the default) it checks its cancellation token between
//! units and bails out with a shutdown-abort; otherwise it ignores the token
//! and runs every unit, like a plugin written before cancellation existed.
//! It records the units it completed as usage `units_done` either way, so a
//! caller can see how far it got.
//!
//! It also shows what a plugin is told about its request (ABI 1.1): its
//! output echoes the request id, the time left until its deadline and the
//! reserved fields; it logs a line when cancelled; and `user_error` makes it
//! fail the way the reference host reports a user's error.

use std::time::Duration;

use etl_plugin::{
    export_plugin, schemars, Capabilities, Context, Error, JsonSchema, Level, Plugin, PluginError,
};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
pub struct Input {
    units: i64,
    #[serde(default = "ten")]
    unit_ms: i64,
    #[serde(default = "yes")]
    cooperative: bool,
    #[serde(default)]
    user_error: bool,
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
    request_id: Option<String>,
    /// Milliseconds left until the deadline when the work ended.
    remaining_ms: Option<u64>,
    invocation_settings: Option<String>,
    invocation_context: Option<String>,
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
        if input.user_error {
            return Err(
                Error::with_status(400, "units must be counted in whole numbers")
                    .with_type("UserError")
                    .with_category("invalid_input")
                    .with_plugin_error(PluginError::user("invalid_input")),
            );
        }
        let unit = Duration::from_millis(input.unit_ms.max(0) as u64);
        let mut done = 0;
        while done < input.units {
            if input.cooperative && ctx.is_cancelled() {
                ctx.add_usage("units_done", done);
                let why = format!("cancelled after {done} of {} units", input.units);
                ctx.log(Level::Warn, format!("slow: {why}"));
                ctx.info(why);
                return Err(Error::shutdown());
            }
            std::thread::sleep(unit);
            done += 1;
        }
        ctx.add_usage("units_done", done);
        Ok(Output {
            done,
            request_id: ctx.request_id().map(str::to_owned),
            remaining_ms: ctx.remaining().map(|d| d.as_millis() as u64),
            invocation_settings: ctx.invocation_settings().map(str::to_owned),
            invocation_context: ctx.invocation_context().map(str::to_owned),
        })
    }
}

export_plugin!(Slow);
