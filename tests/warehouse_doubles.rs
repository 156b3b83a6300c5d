//! The cloud warehouse doubles themselves, driven with a bare HTTP client: they refuse what
//! the real services refuse, so the source tests that pass against them mean something.

mod support;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::bigquery_double::BigQueryDouble;
use support::databricks_double::{self as db, DatabricksDouble, DbResult};
use support::snowflake_double::{self as sf, SfResult, SnowflakeDouble};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: Value, pem: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn snowflake_submit(double: &SnowflakeDouble, jwt: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v2/statements?async=true", double.url))
        .bearer_auth(jwt)
        .header("X-Snowflake-Authorization-Token-Type", "KEYPAIR_JWT")
        .json(&json!({"statement": "SELECT 1", "warehouse": sf::WAREHOUSE, "role": sf::ROLE, "parameters": {"MULTI_STATEMENT_COUNT": "1"}}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn the_snowflake_double_checks_the_jwt_claims_and_signature() {
    let double = SnowflakeDouble::start().await;
    double.serve(
        "SELECT 1",
        SfResult::rows(
            vec![json!({"name": "X", "type": "fixed", "scale": 0})],
            vec![vec![Some("1")]],
        ),
    );
    let qualified = format!("{}.{}", sf::ACCOUNT.to_ascii_uppercase(), sf::USER);
    let good = json!({
        "iss": format!("{qualified}.SHA256:FZva96uy87qlUvghv6wEmVHcjptRwrO2kFyk/75llTk="),
        "sub": qualified, "iat": now(), "exp": now() + 3000,
    });
    assert_eq!(
        snowflake_submit(&double, &sign(good.clone(), sf::PRIVATE_KEY))
            .await
            .0,
        202
    );

    let mut wrong_fingerprint = good.clone();
    wrong_fingerprint["iss"] = json!(format!("{qualified}.SHA256:AAAA"));
    let (status, body) = snowflake_submit(&double, &sign(wrong_fingerprint, sf::PRIVATE_KEY)).await;
    assert_eq!((status, body["code"].clone()), (401, json!("390144")));
    assert_eq!(
        snowflake_submit(&double, &sign(good.clone(), sf::OTHER_PRIVATE_KEY))
            .await
            .0,
        401
    );
    let mut too_long = good;
    too_long["exp"] = json!(now() + 7200);
    assert_eq!(
        snowflake_submit(&double, &sign(too_long, sf::PRIVATE_KEY))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn the_databricks_storage_refuses_a_bearer_token_and_serves_chunks_by_link() {
    let double = DatabricksDouble::start().await;
    double.running_polls(0);
    double.serve(
        "SELECT 1",
        DbResult::rows(
            vec![json!({"name": "x", "type_name": "INT"})],
            vec![vec![Some("1")]],
        ),
    );
    let client = reqwest::Client::new();
    let answer: Value = client
        .post(format!("{}/api/2.0/sql/statements", double.url))
        .bearer_auth(db::PAT)
        .json(&json!({"statement": "SELECT 1", "warehouse_id": db::WAREHOUSE_ID, "wait_timeout": "10s", "disposition": "EXTERNAL_LINKS", "format": "JSON_ARRAY"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"]["state"], json!("SUCCEEDED"));
    let link = answer["result"]["external_links"][0]["external_link"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_token = client.get(&link).bearer_auth(db::PAT).send().await.unwrap();
    assert_eq!(
        with_token.status().as_u16(),
        400,
        "S3 refuses two auth mechanisms"
    );
    let rows: Value = client.get(&link).send().await.unwrap().json().await.unwrap();
    assert_eq!(rows, json!([["1"]]));

    let bad_wait = client
        .post(format!("{}/api/2.0/sql/statements", double.url))
        .bearer_auth(db::PAT)
        .json(&json!({"statement": "SELECT 1", "warehouse_id": db::WAREHOUSE_ID, "wait_timeout": "3s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad_wait.status().as_u16(),
        400,
        "wait_timeout is 0 or 5 to 50 seconds"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:wrong", db::CLIENT_ID));
    let token = client
        .post(format!("{}/oidc/v1/token", double.url))
        .header("Authorization", format!("Basic {basic}"))
        .body("grant_type=client_credentials&scope=all-apis")
        .send()
        .await
        .unwrap();
    assert_eq!(token.status().as_u16(), 401);
}

#[tokio::test]
async fn the_google_token_endpoint_checks_the_assertion_and_the_metadata_server_its_header() {
    let double = BigQueryDouble::start().await;
    let client = reqwest::Client::new();
    let exchange = |assertion: String| {
        client
            .post(format!("{}/token", double.url))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
    };
    let claims = json!({
        "iss": support::bigquery_double::CLIENT_EMAIL,
        "scope": "https://www.googleapis.com/auth/bigquery",
        "aud": "https://oauth2.googleapis.com/token",
        "iat": now(), "exp": now() + 3600,
    });
    assert_eq!(
        exchange(sign(claims.clone(), sf::PRIVATE_KEY))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        exchange(sign(claims.clone(), sf::OTHER_PRIVATE_KEY))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    let mut other_audience = claims;
    other_audience["aud"] = json!("https://evil.example/token");
    assert_eq!(
        exchange(sign(other_audience, sf::PRIVATE_KEY))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );

    let metadata = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        double.url
    );
    assert_eq!(client.get(&metadata).send().await.unwrap().status().as_u16(), 403);
    let ok = client
        .get(&metadata)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}
