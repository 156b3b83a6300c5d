//! What Salesforce's answers say: the codes and message of an error body, which `400`s are
//! about the request rather than a record, and the per-record results of a collections call.
//!
//! Docs: <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_upsert.htm>.

use serde_json::Value as Json;

use super::VENDOR;
use crate::destination::RecordOutcome;
use crate::destination::vendor::answer::excerpt;

/// The `errorCode`s of an error body (`[{"errorCode": …, "message": …}]`).
pub(super) fn error_codes(body: &[u8]) -> Vec<String> {
    let Ok(Json::Array(items)) = serde_json::from_slice::<Json>(body) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| e.get("errorCode").and_then(Json::as_str).map(str::to_owned))
        .collect()
}

/// `errorCode: message` of the first error of an error body, else an excerpt of it.
pub(super) fn salesforce_message(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return excerpt(body);
    };
    let first = match &json {
        Json::Array(items) => items.first(),
        other => Some(other),
    };
    let code = first.and_then(|e| e.get("errorCode")).and_then(Json::as_str);
    let message = first.and_then(|e| e.get("message")).and_then(Json::as_str);
    match (code, message) {
        (Some(c), Some(m)) => excerpt(format!("{c}: {m}").as_bytes()),
        (Some(c), None) => c.to_owned(),
        (None, Some(m)) => excerpt(m.as_bytes()),
        (None, None) => excerpt(body),
    }
}

/// Error codes of a 400 that name the request, not a record: a field the object does not have
/// (`INVALID_FIELD`, also an External ID field that is not one), an object the org does not
/// have (`INVALID_TYPE`), a resource that does not exist (`NOT_FOUND`). Every record of the
/// sync would meet them, so the run stops rather than splitting the batch down to single
/// records; a value Salesforce cannot read (`JSON_PARSER_ERROR`) is about one record and is
/// split as before. <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>
/// ("400: the JSON or XML body contains an error"), and the API's `StatusCode` list.
pub(super) const REQUEST_CODES: &[&str] = &["INVALID_FIELD", "INVALID_TYPE", "NOT_FOUND"];

/// Error codes of a per-record result that are worth trying again.
pub(super) const TRANSIENT_CODES: &[&str] = &[
    "UNABLE_TO_LOCK_ROW",
    "REQUEST_RUNNING_TOO_LONG",
    "SERVER_UNAVAILABLE",
];
/// Error codes of a per-record delete result that mean the record is already gone.
pub(super) const GONE_CODES: &[&str] = &["ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY", "NOT_FOUND"];

/// One outcome per sent record from a collections answer (results in request order).
pub(super) fn read_results(answer: &[u8], sent: usize, deleting: bool) -> Vec<RecordOutcome> {
    let results = match serde_json::from_slice::<Json>(answer) {
        Ok(Json::Array(items)) => items,
        _ => Vec::new(),
    };
    (0..sent)
        .map(|i| {
            let Some(result) = results.get(i) else {
                return RecordOutcome::Retry(format!("{VENDOR} reported no result for the record"));
            };
            if result.get("success") == Some(&Json::Bool(true)) {
                return RecordOutcome::Accepted;
            }
            let errors: Vec<&Json> = result
                .get("errors")
                .and_then(Json::as_array)
                .map(|e| e.iter().collect())
                .unwrap_or_default();
            let code_of = |e: &Json| {
                e.get("statusCode")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            if deleting
                && !errors.is_empty()
                && errors.iter().all(|e| GONE_CODES.contains(&code_of(e).as_str()))
            {
                return RecordOutcome::Accepted;
            }
            let reason = errors
                .iter()
                .map(|e| {
                    let message = e.get("message").and_then(Json::as_str).unwrap_or_default();
                    let fields: Vec<&str> = e
                        .get("fields")
                        .and_then(Json::as_array)
                        .map(|f| f.iter().filter_map(Json::as_str).collect())
                        .unwrap_or_default();
                    let fields = if fields.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", fields.join(", "))
                    };
                    format!("{}: {message}{fields}", code_of(e))
                })
                .collect::<Vec<_>>()
                .join("; ");
            let reason = if reason.is_empty() {
                format!("{VENDOR} refused the record")
            } else {
                excerpt(reason.as_bytes())
            };
            if !errors.is_empty()
                && errors
                    .iter()
                    .all(|e| TRANSIENT_CODES.contains(&code_of(e).as_str()))
            {
                RecordOutcome::Retry(reason)
            } else {
                RecordOutcome::Rejected(reason)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_record_results_map_in_order_and_a_missing_record_is_deleted() {
        let answer = br#"[{"id":"003A","success":true,"created":true,"errors":[]},
            {"success":false,"errors":[{"statusCode":"REQUIRED_FIELD_MISSING","message":"Required fields are missing: [LastName]","fields":["LastName"]}]},
            {"success":false,"errors":[{"statusCode":"UNABLE_TO_LOCK_ROW","message":"locked"}]}]"#;
        assert_eq!(
            read_results(answer, 4, false),
            vec![
                RecordOutcome::Accepted,
                RecordOutcome::Rejected(
                    "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (LastName)".into()
                ),
                RecordOutcome::Retry("UNABLE_TO_LOCK_ROW: locked".into()),
                RecordOutcome::Retry("Salesforce reported no result for the record".into()),
            ]
        );
        let gone = br#"[{"id":"003A","success":false,"errors":[{"statusCode":"ENTITY_IS_DELETED","message":"deleted"}]}]"#;
        assert_eq!(read_results(gone, 1, true), vec![RecordOutcome::Accepted]);
    }

    #[test]
    fn error_bodies_give_the_first_code_and_message() {
        let body = br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        assert_eq!(error_codes(body), vec!["REQUEST_LIMIT_EXCEEDED".to_owned()]);
        assert_eq!(
            salesforce_message(body),
            "REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded."
        );
    }
}
