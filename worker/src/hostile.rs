//! Hostile input against the worker's parsers: `WWW-Authenticate`
//! challenges, token answers, durations. No panic, whatever upstream sends.

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn challenges(values in proptest::collection::vec(".{0,120}", 0..4),
                  shaped in r#"(Bearer|Basic|bearer)? ?((realm|service|scope)=("[^"]{0,30}"?|[a-z:/.]{0,20}),? ?){0,4}"#) {
        let _ = crate::auth::parse_challenges(values.iter().map(String::as_str));
        let _ = crate::auth::parse_challenges([shaped.as_str()]);
    }

    /// What a registry sends is read back exactly, whatever the values hold
    /// (commas, spaces, `=` inside quotes).
    #[test]
    fn bearer_challenges_round_trip(realm in r#"[^"\\]{1,40}"#, service in r#"[^"\\]{0,20}"#) {
        let header = format!(r#"Bearer realm="{realm}",service="{service}""#);
        let parsed = crate::auth::parse_challenges([header.as_str()]);
        let want = crate::auth::Challenge::Bearer { realm, service: Some(service), scope: None };
        prop_assert_eq!(parsed, vec![want]);
    }

    #[test]
    fn token_answers(body in proptest::collection::vec(any::<u8>(), 0..200), json in r#"\{("(token|access_token|expires_in)": ?("[a-z]{0,8}"|-?[0-9]{1,22}|null),? ?){0,3}\}"#) {
        let _ = serde_json::from_slice::<crate::auth::TokenResponse>(&body);
        let _ = serde_json::from_str::<crate::auth::TokenResponse>(&json);
    }

    #[test]
    fn durations(s in ".{0,30}", n in any::<u64>(), unit in "(ms|s|m|h|d|min|sec| s)") {
        let _ = crate::config::parse_duration(&s);
        let _ = crate::config::parse_duration(&format!("{n}{unit}"));
    }
}
