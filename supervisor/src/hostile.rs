//! Hostile input against the front's parsers: CONFIG, routing, the access
//! policy, htpasswd files, Basic headers, metrics pages. No panic; what
//! routing accepts is a valid request for a configured upstream.

use proptest::prelude::*;

use crate::routing::{Route, Routes};
use regcache_protocol::request::Method;

fn routes() -> Routes {
    Routes::new(
        &crate::config::parse(
            r#"["ghcr.io", "docker.io", {"registry": "http://127.0.0.1:15000", "aliases": ["upstream.test"]}]"#,
        )
        .unwrap(),
    )
}

fn json_item() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z0-9.:/_-]{0,30}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("registry".to_string()),
                    Just("variables".to_string()),
                    Just("aliases".to_string()),
                    "[a-z]{1,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn configs(text in ".{0,200}", items in proptest::collection::vec(json_item(), 0..5)) {
        let _ = crate::config::parse(&text);
        let json = serde_json::Value::from(items).to_string();
        match crate::config::parse(&json) {
            Ok(ups) => prop_assert!(!ups.is_empty()),
            Err(e) => prop_assert!(!e.reason.is_empty()),
        }
    }

    #[test]
    fn routing(path in r"[a-zA-Z0-9./:%_-]{0,80}", query in proptest::option::of("[a-z=&%0-9.:]{0,40}"),
               host in proptest::option::of("[a-zA-Z0-9.:\\[\\]-]{0,30}")) {
        let r = routes();
        for p in [format!("/v2/{path}"), format!("/{path}"), path.clone()] {
            if let Ok(Route::Upstream { index, request, .. }) = r.route(Method::Get, host.as_deref(), &p, query.as_deref()) {
                prop_assert!(index < 3);
                prop_assert!(!request.name.as_str().contains(".."));
            }
        }
    }

    #[test]
    fn access_policies_and_htpasswd(text in ".{0,200}", user in ".{0,20}") {
        if let Ok(p) = crate::access::Policy::parse(&text) {
            let up = &crate::config::parse(r#"["ghcr.io"]"#).unwrap()[0];
            let _ = p.allows(&crate::access::Caller::User(user.clone()), up, "org/app");
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        let _ = crate::client_auth::Htpasswd::load(file.path().to_str().unwrap(), None);
    }

    #[test]
    fn basic_headers(value in "[ -~]{0,80}") {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            let _ = crate::client_auth::parse_basic(&v);
        }
    }

    #[test]
    fn metrics_pages(pages in proptest::collection::vec("(# (HELP|TYPE) [a-z_]{1,10} .{0,10}\n|[a-z_]{1,10}(\\{[a-z]{1,5}=\"[a-z]{0,5}\"\\})? [0-9.e+-]{1,8}\n|.{0,20}\n){0,6}", 0..4)) {
        let _ = crate::metrics::merge(pages.iter().map(String::as_str));
    }
}
