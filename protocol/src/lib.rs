//! The registry API as regcache speaks it, shared by the front and the workers.
//!
//! # Layout
//! - [`reference`]: validated names, tags, digests and upstream authorities;
//!   nothing unvalidated reaches a store or an upstream
//! - [`request`]: a `/v2/...` path and method -> one typed [`request::Request`]
//! - [`range`]: the `Range` header of blob requests
//! - [`response`]: manifest and blob responses, `X-Cache`, the last touches
//!   every response gets
//! - [`error`]: the registry error envelope, the only place it is built
//! - [`body`]: the response body type
//! - [`internal`]: the worker endpoints only the front asks, and their types
//! - [`manifest`]: what a manifest refers to (blobs, child manifests)
//!
//! Nothing here does I/O: this crate is the vocabulary both processes use.
#![forbid(unsafe_code)]

pub mod body;
pub mod error;
pub mod follow;
#[cfg(test)]
mod hostile;
pub mod internal;
pub mod manifest;
pub mod range;
pub mod reference;
pub mod request;
pub mod response;

pub use reference::{Algorithm, Authority, Digest, Hasher, Manifest, Name, Reference, Tag};
