//! `wordcount`: counts the words and bytes of `text`, `repeat` times over.
//!
//! The example plugin of etl-serve's docs, tests and benchmarks. Its schema
//! is exactly what the reference host derives from the Python function
//! `def wordcount(usage: list, text: str, repeat: int = 1) -> Out`, so both
//! hosts give it the same plugin id.

use etl_plugin::{export_plugin, schemars, Capabilities, Context, Error, JsonSchema, Plugin};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
pub struct Input {
    text: String,
    #[serde(default = "one")]
    repeat: i64,
}

fn one() -> i64 {
    1
}

#[derive(Serialize, JsonSchema)]
pub struct Output {
    words: i64,
    chars: i64,
}

pub struct Wordcount;

impl Plugin for Wordcount {
    type Input = Input;
    type Output = Output;
    const NAME: &'static str = "wordcount";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const CAPABILITIES: Capabilities = Capabilities {
        usage: true,
        ..Capabilities::NONE
    };

    fn init(_config: &str) -> Result<Self, Error> {
        Ok(Wordcount)
    }

    fn invoke(&self, input: Input, ctx: &mut Context) -> Result<Output, Error> {
        let words = input.text.split_whitespace().count() as i64 * input.repeat;
        let chars = input.text.len() as i64 * input.repeat;
        ctx.add_usage("chars", chars);
        Ok(Output { words, chars })
    }
}

export_plugin!(Wordcount);
