//! The lease protocol over HTTP, one body for both stores (`http_api.rs`, `valkey_http.rs`).

use http::Method;
use serde_json::{json, Value};
use servicekit::protocol::problem_type as t;

use super::http::{Api, Reply};

const JSON: (&str, &str) = ("content-type", "application/json");

async fn post(api: &Api, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    let bytes = serde_json::to_vec(body).expect("json");
    api.send(Method::POST, "/services/$register", &all, Some(bytes))
        .await
}

fn forbidden(r: &Reply) {
    let p = r.assert_problem(403, t::FORBIDDEN);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("X-Lease-Token"),
        "{p}"
    );
}

/// A leased entry: only its token (or `admin`, the admin key) pings, deletes or re-registers
/// it; everyone else gets 403 and changes nothing. An unleased registration works as the
/// reference client's does.
pub async fn leased_entries_refuse_strangers(api: &Api, admin: Option<&str>) {
    let url = "http://leased:8000";
    let r = post(
        api,
        &json!({"url": url, "info": {"display_name": "L"}, "lease": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let answer: Value = r.json();
    let id = answer["id"].as_str().expect("id").to_owned();
    let token = answer["lease_token"]
        .as_str()
        .expect("lease_token")
        .to_owned();
    assert_eq!(token.len(), 64, "256 bits, hex");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let mine = [("x-lease-token", token.as_str())];
    let ping = format!("/services/{id}/$ping");
    let entry = format!("/services/{id}");

    // A second client without the token, or with a wrong one.
    for headers in [
        vec![],
        vec![("x-lease-token", "0123")],
        vec![("x-admin-key", "guess")],
    ] {
        forbidden(&api.send(Method::PUT, &ping, &headers, None).await);
        forbidden(&api.send(Method::DELETE, &entry, &headers, None).await);
        for body in [
            json!({"url": url, "info": {"display_name": "Hijacked"}}),
            json!({"url": url, "info": {"display_name": "Hijacked"}, "lease": true}),
        ] {
            forbidden(&post(api, &body, &headers).await);
        }
    }
    let record: Value = api.get(&entry).await.json();
    assert_eq!(
        record["info"]["display_name"], "L",
        "refused writes changed nothing"
    );
    assert!(
        record.get("lease_token").is_none(),
        "reads never show a lease"
    );

    // The holder: ping, re-register (the answer echoes its token), and delete.
    let r = api.send(Method::PUT, &ping, &mine, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = post(
        api,
        &json!({"url": url, "info": {"display_name": "L2"}, "lease": true}),
        &mine,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let again: Value = r.json();
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["lease_token"], token.as_str(), "the lease is kept");

    if let Some(key) = admin {
        let by_admin = [("x-admin-key", key)];
        let r = api.send(Method::PUT, &ping, &by_admin, None).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = post(
            api,
            &json!({"url": url, "info": {"display_name": "L3"}}),
            &by_admin,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.json::<Value>().get("lease_token").is_none(),
            "the admin learns no token"
        );
        let r = api.send(Method::DELETE, &entry, &by_admin, None).await;
        assert_eq!(r.status, 200, "{r:?}");
    } else {
        let r = api.send(Method::DELETE, &entry, &mine, None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(api.get(&entry).await.status, 404);

    // Gone: the URL is free for anyone, and a registration without a lease is what the
    // reference client knows: no lease_token, pings and deletes without headers.
    let r = post(
        api,
        &json!({"url": url, "info": {"display_name": "Free"}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let plain: Value = r.json();
    assert!(plain.get("lease_token").is_none(), "{plain}");
    let id = plain["id"].as_str().expect("id");
    assert_eq!(api.put(&format!("/services/{id}/$ping")).await.status, 200);
    assert_eq!(api.delete(&format!("/services/{id}")).await.status, 200);
}
