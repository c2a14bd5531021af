//! Hostile input against every parser of this crate: no panic, and what is
//! accepted is safe (no path component that climbs, no separator in a tag or
//! digest, ranges inside the blob), and serializes back to itself.

use proptest::prelude::*;

use crate::range::{self, Plan};
use crate::reference::{Digest, Name, Reference, Tag};
use crate::request::{self, Request};

/// Strings made of the characters that matter to paths and names.
fn tricky() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r"[a-zA-Z0-9._\-/:%@ \\]{0,80}").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn names_tags_and_digests(s in tricky(), any in ".{0,100}") {
        for input in [&s, &any] {
            if let Ok(n) = input.parse::<Name>() {
                prop_assert!(n.components().all(|c| !c.is_empty() && c != "." && c != ".."));
                prop_assert!(!n.as_str().starts_with('/') && !n.as_str().contains('\\'));
                prop_assert_eq!(n.as_str().parse::<Name>().unwrap(), n.clone());
            }
            if let Ok(t) = input.parse::<Tag>() {
                prop_assert!(!t.as_str().contains('/') && t.as_str() != ".." && t.as_str() != ".");
            }
            if let Ok(d) = input.parse::<Digest>() {
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
            }
            let _ = input.parse::<Reference>();
        }
    }

    #[test]
    fn request_paths(path in tricky(), query in proptest::option::of(".{0,40}"), head in any::<bool>()) {
        let method = if head { http::Method::HEAD } else { http::Method::GET };
        for p in [format!("/v2/{path}"), path.clone()] {
            if let Ok(Request::Repo(r)) = request::parse(&method, &p, query.as_deref()) {
                let pq = r.path_and_query();
                let (again_path, again_query) = match pq.split_once('?') {
                    Some((a, b)) => (a.to_owned(), Some(b.to_owned())),
                    None => (pq.clone(), None),
                };
                let again = request::parse(&method, &again_path, again_query.as_deref()).unwrap();
                prop_assert_eq!(again, Request::Repo(r));
            }
        }
    }

    #[test]
    fn ranges(header in proptest::option::of(".{0,30}"), size in proptest::option::of(0u64..1 << 40)) {
        match range::plan(header.as_deref(), size) {
            Plan::Partial(r) => {
                let size = size.expect("a partial range needs a size");
                prop_assert!(r.start < r.end && r.end <= size);
            }
            Plan::Full | Plan::Unsatisfiable => {}
        }
    }

    #[test]
    fn byte_ranges_shaped_like_real_ones(a in 0u64..2000, b in 0u64..2000, size in 0u64..1000) {
        for h in [format!("bytes={a}-{b}"), format!("bytes={a}-"), format!("bytes=-{b}")] {
            if let Plan::Partial(r) = range::plan(Some(&h), Some(size)) {
                prop_assert!(r.start < r.end && r.end <= size, "{h} of {size}: {r:?}");
            }
        }
    }

    #[test]
    fn manifests(bytes in proptest::collection::vec(any::<u8>(), 0..400), kind in 0usize..4) {
        let media_type = ["application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws", "x/y"][kind];
        let bytes = bytes::Bytes::from(bytes);
        let m = crate::Manifest {
            media_type: media_type.into(),
            digest: Digest::of(crate::Algorithm::Sha256, &bytes),
            bytes,
        };
        let _ = crate::manifest::references(&m);
    }
}
