//! The reference host's dialect: what etl-uvicorn (FastAPI and pydantic)
//! does with a request body and a schema, reproduced byte for byte so that
//! etl-serve answers as it does.
//!
//! - [`validate`]: a request body to the plugin's input, or the 4xx the
//!   reference would answer (pydantic's lax conversions, FastAPI's 422
//!   items, the reserved `/invoke` fields);
//! - [`plugin_id`]: the id the reference derives from a plugin's schema
//!   (Python's `json.dumps`, byte for byte).
//!
//! Nothing here knows about HTTP, plugins or threads: it is pure functions
//! over bytes and `serde_json` values, and its tests include property tests
//! against second implementations (`proptests`).

pub mod plugin_id;
pub mod validate;

#[cfg(test)]
mod proptests;
