//! References between the objects of the set: a ReverseSync's Destination, and the Secrets
//! Destinations and ReverseSyncs name, with the grant each Secret must give its user.
//!
//! - A Destination missing from the set is an error: the sync could never run.
//! - A Secret missing from the set is a warning (Secrets usually come from a secrets manager,
//!   not from the repository), an error with `--require-secrets`.
//! - A Secret in the set that does not grant its user in `backflow.dev/allowed-references` is
//!   an error: the operator refuses it (`SecretNotGranted`) unless it runs with
//!   `--secret-access=namespace`, which `validate` takes as well.
//! - A key named explicitly and absent from the Secret is an error; a reference to another
//!   namespace is an error (only the object's own namespace is ever read).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::Value as Json;

use super::{Check, Finding, Options, Place, Severity};
use crate::controller::resolve::{ALLOWED_REFERENCES, SecretAccess, grants};
use crate::engine::setup::SecretUser;

/// What a Secret of the set offers.
struct SecretInfo {
    keys: BTreeSet<String>,
    grant: Option<String>,
}

enum Target {
    Destination,
    /// A Secret, the key named explicitly and the finding to report against that key.
    Secret {
        key: Option<Box<(String, Finding)>>,
        user: SecretUser,
    },
}

/// One reference, and the finding to report against the field that holds it.
struct Use {
    namespace: String,
    name: String,
    target: Target,
    at: Finding,
}

/// The objects of the set and the references between them.
#[derive(Default)]
pub struct Index {
    secrets: HashMap<(String, String), SecretInfo>,
    destinations: HashSet<(String, String)>,
    uses: Vec<Use>,
    findings: Vec<Finding>,
}

impl Index {
    /// Records a Secret document.
    pub(super) fn add_secret(&mut self, place: &Place, json: &Json) {
        let Some(name) = place.name.clone() else { return };
        let mut keys = BTreeSet::new();
        for field in ["data", "stringData"] {
            if let Some(map) = json.get(field).and_then(Json::as_object) {
                keys.extend(map.keys().cloned());
            }
        }
        let grant = json
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(ALLOWED_REFERENCES))
            .and_then(Json::as_str)
            .map(str::to_owned);
        self.secrets
            .insert((place.namespace.clone(), name), SecretInfo { keys, grant });
    }

    /// Records a Destination and the Secret it names.
    pub(super) fn add_destination(&mut self, place: &Place, json: &Json) {
        let Some(name) = place.name.clone() else { return };
        self.destinations.insert((place.namespace.clone(), name.clone()));
        self.secret_ref(
            place,
            json,
            "spec.credentialsSecretRef",
            SecretUser::destination(&name),
        );
    }

    /// Records a ReverseSync's Destination and Secrets.
    pub(super) fn add_sync(&mut self, place: &Place, json: &Json) {
        let Some(name) = place.name.clone() else { return };
        if let Some(target) = self.reference(place, json, "spec.destinationRef") {
            let at = place.finding(
                Severity::Error,
                Check::Reference,
                "spec.destinationRef.name",
                String::new(),
            );
            self.uses.push(Use {
                namespace: place.namespace.clone(),
                name: target,
                target: Target::Destination,
                at,
            });
        }
        for field in [
            "spec.source.connectionSecretRef",
            "spec.state.connectionSecretRef",
        ] {
            self.secret_ref(place, json, field, SecretUser::reverse_sync(&name));
        }
    }

    fn secret_ref(&mut self, place: &Place, json: &Json, field: &str, user: SecretUser) {
        let Some(name) = self.reference(place, json, field) else {
            return;
        };
        let key = lookup(json, field)
            .and_then(|r| r.get("key"))
            .and_then(Json::as_str)
            .map(|k| {
                let path = format!("{field}.key");
                let at = place.finding(Severity::Error, Check::Reference, &path, String::new());
                Box::new((k.to_owned(), at))
            });
        let at = place.finding(
            Severity::Error,
            Check::Reference,
            &format!("{field}.name"),
            String::new(),
        );
        self.uses.push(Use {
            namespace: place.namespace.clone(),
            name,
            target: Target::Secret { key, user },
            at,
        });
    }

    /// The name a reference at `field` holds; a reference to another namespace is reported
    /// at once.
    fn reference(&mut self, place: &Place, json: &Json, field: &str) -> Option<String> {
        let reference = lookup(json, field)?;
        if let Some(ns) = reference.get("namespace").and_then(Json::as_str)
            && ns != place.namespace
        {
            self.findings.push(place.finding(
                Severity::Error,
                Check::Reference,
                &format!("{field}.namespace"),
                format!(
                    "names namespace {ns:?}, but only the object's own namespace ({}) is ever read: leave it unset",
                    place.namespace
                ),
            ));
        }
        let name = reference.get("name").and_then(Json::as_str)?;
        (!name.is_empty()).then(|| name.to_owned())
    }

    /// Every finding about references, once all documents are read.
    pub(super) fn check(self, options: &Options) -> Vec<Finding> {
        let mut out = self.findings;
        for u in self.uses {
            let key = (u.namespace.clone(), u.name.clone());
            let mut finding = u.at;
            match u.target {
                Target::Destination => {
                    if !self.destinations.contains(&key) {
                        finding.message = format!(
                            "Destination {}/{} is not in the given files: the sync could not run",
                            u.namespace, u.name
                        );
                        out.push(finding);
                    }
                }
                Target::Secret {
                    key: secret_key,
                    user,
                } => match self.secrets.get(&key) {
                    None => {
                        finding.message = format!(
                            "Secret {}/{} is not in the given files (fine when a secrets manager creates it{})",
                            u.namespace,
                            u.name,
                            if options.require_secrets {
                                "; --require-secrets is set"
                            } else {
                                ""
                            }
                        );
                        if !options.require_secrets {
                            finding.severity = Severity::Warning;
                        }
                        out.push(finding);
                    }
                    Some(secret) => {
                        if options.secret_access == SecretAccess::Granted
                            && !grants(secret.grant.as_deref().unwrap_or(""), &user)
                        {
                            let mut f = finding.clone();
                            f.check = Check::SecretGrant;
                            f.message = format!(
                                "Secret {}/{} does not grant {user}: the operator refuses it (SecretNotGranted); \
                                 add \"{}/{}\" to its {ALLOWED_REFERENCES} annotation",
                                u.namespace, u.name, user.kind, user.name
                            );
                            out.push(f);
                        }
                        if let Some((k, mut finding)) = secret_key.map(|b| *b)
                            && !secret.keys.contains(&k)
                        {
                            finding.message = format!(
                                "Secret {}/{} has no key {k:?} (keys: {})",
                                u.namespace,
                                u.name,
                                secret.keys.iter().cloned().collect::<Vec<_>>().join(", ")
                            );
                            out.push(finding);
                        }
                    }
                },
            }
        }
        out
    }
}

/// The value at a dotted field path of an object.
fn lookup<'a>(json: &'a Json, field: &str) -> Option<&'a Json> {
    field
        .split('.')
        .try_fold(json, |v, part| v.get(part))
        .filter(|v| !v.is_null())
}
