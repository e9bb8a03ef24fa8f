//! `arcgis-app-proxy import-esri`: an Esri resource-proxy configuration
//! (`proxy.config` XML, as the DotNet, Java and PHP versions read it, or the
//! Node version's `proxy.json`) turned into an equivalent `proxy.toml` and a
//! review list.
//!
//! Nothing secret is carried over as a value: every client secret, password
//! and access token becomes a `*_env` key naming a variable, and the review
//! lists which variables to set (never their values). What cannot be carried
//! over safely — an open proxy (`mustMatch="false"`), an unusable URL — makes
//! the import fail instead of producing a weaker config.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use url::Url;

/// One `serverUrl` entry, attribute names lower-cased.
type Attrs = BTreeMap<String, String>;

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// The `proxy.toml` text (empty when `refused`).
    pub toml: String,
    /// Points for the operator to review, one line each.
    pub notes: Vec<String>,
    /// Environment variables the new config reads secrets from.
    pub variables: Vec<String>,
    /// Something could not be carried over safely: do not use the output.
    pub refused: bool,
}

/// The parsed resource-proxy configuration.
/// No `Debug`: the attributes hold the old file's secrets (clientSecret,
/// password, accessToken), which must never be printed.
#[derive(Default)]
struct Esri {
    proxy: Attrs,
    /// `allowedReferers` as a list (XML gives one comma-separated string).
    referers: Vec<String>,
    servers: Vec<Attrs>,
}

/// Converts `text` (XML or JSON, told apart by its first character).
pub fn import(text: &str) -> Result<Imported, String> {
    let esri = if text.trim_start().starts_with('{') {
        from_json(text)?
    } else {
        from_xml(text)?
    };
    Ok(convert(&esri))
}

fn from_xml(text: &str) -> Result<Esri, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut esri = Esri::default();
    let mut seen_root = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("not XML at byte {}: {e}", reader.buffer_position()))?;
        let element = match event {
            Event::Start(e) | Event::Empty(e) => e,
            Event::Eof => break,
            _ => continue,
        };
        let name = element.local_name().as_ref().to_ascii_lowercase();
        let mut attrs = Attrs::new();
        for a in element.attributes() {
            let a = a.map_err(|e| format!("bad attribute in <{name}>: {e}"))?;
            let key = a.key.local_name().as_ref().to_ascii_lowercase();
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                // The parser's message could quote part of the value, and
                // the value may be a secret: name the attribute only.
                .map_err(|_| {
                    format!("bad value of {key} in <{name}>: an unknown or malformed &entity;")
                })?;
            attrs.insert(key, value.trim().to_string());
        }
        match name.as_str() {
            "proxyconfig" => {
                seen_root = true;
                esri.referers = attrs
                    .get("allowedreferers")
                    .map(|r| split_list(r))
                    .unwrap_or_default();
                esri.proxy = attrs;
            }
            "serverurl" => esri.servers.push(attrs),
            _ => {}
        }
    }
    if !seen_root {
        return Err("no <ProxyConfig> element: is this a resource-proxy proxy.config?".into());
    }
    Ok(esri)
}

fn from_json(text: &str) -> Result<Esri, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let lower = |o: &serde_json::Map<String, Value>| -> Attrs {
        o.iter()
            .filter_map(|(k, v)| scalar(v).map(|s| (k.to_ascii_lowercase(), s)))
            .collect()
    };
    // `proxyConfig` is an object, or a one-element array of one.
    let pc = match v.get("proxyConfig") {
        Some(Value::Array(a)) => a.first().cloned(),
        Some(o @ Value::Object(_)) => Some(o.clone()),
        _ => None,
    }
    .ok_or("no proxyConfig object: is this a resource-proxy proxy.json?")?;
    let pc = pc.as_object().ok_or("proxyConfig is not an object")?;
    let referers = match pc
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("allowedReferers"))
    {
        Some((_, Value::Array(a))) => a.iter().filter_map(scalar).collect(),
        Some((_, Value::String(s))) => split_list(s),
        _ => Vec::new(),
    };
    let servers = v
        .get("serverUrls")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).map(lower).collect())
        .unwrap_or_default();
    Ok(Esri {
        proxy: lower(pc),
        referers,
        servers,
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

fn truthy(v: Option<&String>) -> Option<bool> {
    v.map(|s| s.eq_ignore_ascii_case("true"))
}

/// `host.example.com` → `host_example_com`, unique among `taken`.
fn unique_name(base: &str, taken: &mut Vec<String>) -> String {
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name = name.trim_matches('_').to_string();
    if name.is_empty() {
        name = "server".into();
    }
    let mut candidate = name.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{name}_{n}");
        n += 1;
    }
    taken.push(candidate.clone());
    candidate
}

fn toml_str(s: &str) -> String {
    // serde_json's string escaping is valid TOML basic-string escaping for
    // everything a URL or name can hold.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A referer entry in this proxy's syntax, and a note when it changed.
fn referer_entry(e: &str) -> (Option<String>, Option<String>) {
    if e == "*" {
        return (Some("*".into()), None);
    }
    let Some((scheme, rest)) = e.split_once("://") else {
        return (
            None,
            Some(format!(
                "allowedReferers entry {e:?} has no scheme (https://…): left out"
            )),
        );
    };
    let authority = rest.split('/').next().unwrap_or("");
    let origin = format!("{}://{authority}", scheme.to_ascii_lowercase());
    let note = (rest.len() > authority.len() && rest[authority.len()..] != *"/").then(|| {
        format!(
            "allowedReferers entry {e:?} becomes {origin:?}: browsers send only the origin cross-site, so the path could not be checked anyway"
        )
    });
    (Some(origin), note)
}

fn convert(esri: &Esri) -> Imported {
    let mut c = Conversion::default();
    if truthy(esri.proxy.get("mustmatch")) == Some(false) {
        c.out.refused = true;
        c.out.notes.push(
            "mustMatch=\"false\" made resource-proxy forward any URL to anyone: an open proxy. This proxy forwards only to configured routes; list the services as serverUrl entries with mustMatch=\"true\" and import again.".into(),
        );
        return c.out;
    }
    for key in esri.proxy.keys() {
        if !matches!(key.as_str(), "allowedreferers" | "mustmatch") {
            c.out.notes.push(format!(
                "ProxyConfig {key} is not carried over (logging, level and file are [log] and RUST_LOG here)"
            ));
        }
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Imported from an Esri resource-proxy configuration by `arcgis-app-proxy import-esri`.\n# Review the notes it printed; see docs/configuration.md for every key.\n\n[server]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"certs/proxy.crt\"\ntls_key = \"certs/proxy.key\"\nadmin_listen = \"127.0.0.1:9090\"\n# resource-proxy was reached as proxy.ashx / proxy.jsp / proxy.php; point\n# the apps' proxyUrl at https://<this host>/proxy instead.\nproxy_path = \"/proxy\"\n"
    );
    c.referers(&esri.referers, &mut t);
    for (i, s) in esri.servers.iter().enumerate() {
        c.server(i, s);
    }
    if c.routes.is_empty() {
        c.out.refused = true;
        c.out
            .notes
            .push("no usable serverUrl: nothing would be proxied".into());
    }
    t.push_str(&c.credentials);
    t.push_str(&c.routes);
    c.out.toml = t;
    c.out
}

/// What a conversion has written so far.
#[derive(Default)]
struct Conversion {
    out: Imported,
    /// `[credentials.*]` tables.
    credentials: String,
    /// `[[routes]]` tables.
    routes: String,
    /// Route and credential names given out.
    taken: Vec<String>,
}

impl Conversion {
    /// `[referers]` from `allowedReferers`.
    fn referers(&mut self, given: &[String], t: &mut String) {
        let mut referers = Vec::new();
        for e in given {
            let (entry, note) = referer_entry(e);
            self.out.notes.extend(note);
            if let Some(entry) = entry
                && !referers.contains(&entry)
            {
                referers.push(entry);
            }
        }
        if referers.is_empty() {
            self.out.notes.push(
                "no allowedReferers: every request will be refused until [referers] allowed or [[apps]] lists the pages".into(),
            );
        }
        let _ = writeln!(
            t,
            "[referers]\nallowed = [{}]\n",
            referers
                .iter()
                .map(|r| toml_str(r))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    /// One `serverUrl` entry (the `i`th): a route, and its credential.
    fn server(&mut self, i: usize, s: &Attrs) {
        let out = &mut self.out;
        let Some(raw_url) = s.get("url") else {
            out.notes
                .push(format!("serverUrl #{} has no url: left out", i + 1));
            return;
        };
        let url = match Url::parse(raw_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => {
                out.refused = true;
                out.notes.push(format!(
                    "serverUrl {raw_url:?} is not an absolute http(s) URL (resource-proxy accepted prefixes like \"//host\" or bare hosts): write its route by hand"
                ));
                return;
            }
        };
        let mut upstream = url.clone();
        upstream.set_query(None);
        upstream.set_fragment(None);
        let name = unique_name(url.host_str().unwrap_or(""), &mut self.taken);
        if truthy(s.get("matchall")) == Some(false) {
            out.notes.push(format!(
                "serverUrl {raw_url:?} had matchAll=\"false\" (this exact URL only); its route also admits the paths below it: narrow the upstream if that matters"
            ));
        }
        for key in s.keys() {
            if !matches!(
                key.as_str(),
                "url"
                    | "matchall"
                    | "clientid"
                    | "clientsecret"
                    | "oauth2endpoint"
                    | "username"
                    | "password"
                    | "accesstoken"
                    | "ratelimit"
                    | "ratelimitperiod"
            ) {
                out.notes.push(format!(
                    "serverUrl {raw_url:?}: {key} is not supported here and was not carried over"
                ));
            }
        }
        let credential = self.credential(s, &name, &url, raw_url);
        let _ = writeln!(
            self.routes,
            "[[routes]]\nname = {}\nupstream = {}",
            toml_str(&name),
            toml_str(upstream.as_str().trim_end_matches('/'))
        );
        if let Some(c) = &credential {
            let _ = writeln!(self.routes, "credential = {}", toml_str(c));
        }
        self.rate_limit(s, raw_url);
        let _ = writeln!(self.routes);
    }

    /// The entry's credential, written as `[credentials.<name>]` with its
    /// secret read from an environment variable; `None` without one.
    fn credential(&mut self, s: &Attrs, name: &str, url: &Url, raw_url: &str) -> Option<String> {
        let env = name.to_ascii_uppercase();
        if let (Some(id), Some(_)) = (s.get("clientid"), s.get("clientsecret")) {
            let endpoint = s
                .get("oauth2endpoint")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://www.arcgis.com/sharing/oauth2".into());
            let var = format!("{env}_CLIENT_SECRET");
            let _ = writeln!(
                self.credentials,
                "[credentials.{name}]\ntoken_url = {}\nclient_id = {}\nclient_secret_env = {}\n",
                toml_str(&format!("{endpoint}/token")),
                toml_str(id),
                toml_str(&var)
            );
            self.out.variables.push(var);
            Some(name.to_string())
        } else if let (Some(user), Some(_)) = (s.get("username"), s.get("password")) {
            let var = format!("{env}_PASSWORD");
            let discover = url.path().to_ascii_lowercase().contains("/rest/");
            let _ = writeln!(
                self.credentials,
                "[credentials.{name}]\nusername = {}\npassword_env = {}\n{}",
                toml_str(user),
                toml_str(&var),
                if discover {
                    "# token_url left out: found through the server's /rest/info.\n".to_string()
                } else {
                    self.out.refused = true;
                    self.out.notes.push(format!(
                        "serverUrl {raw_url:?} uses a username but its URL has no /rest/ to discover the token service from: set credentials.{name}.token_url"
                    ));
                    "token_url = \"\"  # set: …/sharing/rest/generateToken or …/arcgis/tokens/generateToken\n".to_string()
                }
            );
            self.out.variables.push(var);
            Some(name.to_string())
        } else if s.contains_key("accesstoken") {
            let var = format!("{env}_API_KEY");
            let _ = writeln!(
                self.credentials,
                "[credentials.{name}]\napi_key_env = {}\n",
                toml_str(&var)
            );
            self.out.variables.push(var);
            Some(name.to_string())
        } else {
            if s.contains_key("clientid") || s.contains_key("username") {
                self.out.notes.push(format!(
                    "serverUrl {raw_url:?} has only half a credential (clientId without clientSecret, or username without password): forwarded without a token"
                ));
            }
            None
        }
    }

    /// `rateLimit` per `rateLimitPeriod` minutes, now per client IP.
    fn rate_limit(&mut self, s: &Attrs, raw_url: &str) {
        match (s.get("ratelimit"), s.get("ratelimitperiod")) {
            (Some(n), period) => match (
                n.parse::<u32>(),
                period.map_or(Ok(1), |p| p.parse::<u64>()),
            ) {
                (Ok(n), Ok(p)) if n > 0 && p > 0 => {
                    let _ = writeln!(
                        self.routes,
                        "rate_limit = {{ requests = {n}, per_secs = {} }}  # rateLimit {n} per {p} min, now per client IP",
                        p * 60
                    );
                }
                _ => self.out.notes.push(format!(
                    "serverUrl {raw_url:?}: rateLimit/rateLimitPeriod are not positive numbers: left out"
                )),
            },
            (None, Some(_)) => self.out.notes.push(format!(
                "serverUrl {raw_url:?}: rateLimitPeriod without rateLimit: left out"
            )),
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<!-- The DotNet resource-proxy's file, as operators wrote it -->
<ProxyConfig mustMatch="true" allowedReferers="https://app.example.com/map/, https://*.example.org/*" LOGFILE="proxylog.txt">
  <serverUrls>
    <serverUrl url="https://route.arcgis.com/arcgis/rest/services/World/Route/NAServer"
               clientSecret="S3CRET-one&amp;two" CLIENTID="abc123"
               oauth2Endpoint="https://www.arcgis.com/sharing/oauth2/"
               rateLimit="600" rateLimitPeriod="60" matchAll="true"/>
    <serverUrl matchAll="true" url="https://gis.example.com/arcgis/rest/services" username="svc" password="pa55word"></serverUrl>
    <serverUrl url="https://basemaps-api.arcgis.com/arcgis/rest/services" accessToken="AAPK-secret-key" hostRedirect="https://elsewhere.example.com"/>
    <serverUrl url="https://services.arcgis.com/open/arcgis/rest/services" matchAll="false"/>
  </serverUrls>
</ProxyConfig>"#;

    #[test]
    fn xml_carries_over_without_secrets() {
        let out = import(XML).unwrap();
        assert!(!out.refused, "{:?}", out.notes);
        for secret in ["S3CRET", "pa55word", "AAPK-secret-key"] {
            assert!(
                !out.toml.contains(secret),
                "{secret} written:\n{}",
                out.toml
            );
            assert!(!out.notes.join("\n").contains(secret));
        }
        let t = &out.toml;
        assert!(
            t.contains(r#"allowed = ["https://app.example.com", "https://*.example.org"]"#),
            "{t}"
        );
        assert!(
            t.contains(r#"token_url = "https://www.arcgis.com/sharing/oauth2/token""#),
            "{t}"
        );
        assert!(t.contains(r#"client_id = "abc123""#), "{t}");
        assert!(
            t.contains("rate_limit = { requests = 600, per_secs = 3600 }"),
            "{t}"
        );
        assert!(t.contains(r#"username = "svc""#), "{t}");
        assert_eq!(
            out.variables,
            [
                "ROUTE_ARCGIS_COM_CLIENT_SECRET",
                "GIS_EXAMPLE_COM_PASSWORD",
                "BASEMAPS_API_ARCGIS_COM_API_KEY"
            ]
        );
        let notes = out.notes.join("\n");
        for expected in [
            "hostredirect",
            "matchAll=\"false\"",
            "logfile",
            "becomes \"https://app.example.com\"",
        ] {
            assert!(notes.contains(expected), "{expected} not in\n{notes}");
        }
    }

    #[test]
    fn an_open_proxy_is_refused_not_converted() {
        let out = import(&XML.replace(r#"mustMatch="true""#, r#"MustMatch="FALSE""#)).unwrap();
        assert!(out.refused);
        assert!(out.toml.is_empty());
        assert!(out.notes[0].contains("open proxy"));
    }

    #[test]
    fn json_of_the_node_version() {
        let json = r#"{
          "proxyConfig": [{"mustMatch": true, "logLevel": "WARN",
                           "allowedReferers": ["https://app.example.com", "*"]}],
          "serverUrls": [
            {"url": "https://services.arcgis.com/org/arcgis/rest/services", "matchAll": true,
             "clientId": "id", "clientSecret": "json-secret"},
            {"url": "not a url"}
          ]
        }"#;
        let out = import(json).unwrap();
        assert!(out.refused, "an unusable serverUrl must stop the import");
        assert!(!out.toml.contains("json-secret"));
        assert!(
            out.toml
                .contains(r#"allowed = ["https://app.example.com", "*"]"#)
        );
        assert!(
            out.toml
                .contains(r#"token_url = "https://www.arcgis.com/sharing/oauth2/token""#)
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        for text in [
            "",
            "<ProxyConfig",
            "<x/>",
            "{",
            r#"{"proxyConfig": 5}"#,
            "<ProxyConfig><serverUrls><serverUrl url=\"https://a.example/\" url=\"https://b.example\"/></serverUrls></ProxyConfig>",
        ] {
            let _ = import(text);
        }
        assert!(import("<x/>").is_err());
        // A malformed entity in a secret is reported without the secret.
        let err = import("<ProxyConfig><serverUrl url='https://a.example' clientId='x' clientSecret='SECRET&bogus;'/></ProxyConfig>")
            .unwrap_err();
        assert!(!err.contains("SECRET") && !err.contains("bogus"), "{err}");
        // Names and values with quotes or newlines stay valid TOML strings.
        let out = import(
            "<ProxyConfig allowedReferers='https://a.example.com'><serverUrl url='https://h.example.com/a\"b' clientId='x\"\ny' clientSecret='s'/></ProxyConfig>",
        )
        .unwrap();
        toml::from_str::<toml::Table>(&out.toml).unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    }
}
