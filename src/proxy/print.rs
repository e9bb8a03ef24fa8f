//! Printing maps with secured layers. A print service (`Export Web Map
//! Task`, or any GP task taking `Web_Map_as_JSON`) fetches the map's layers
//! itself, server-side: it can call neither this proxy's URLs nor secured
//! services without a token. So before such a request goes upstream, each
//! layer URL in its `Web_Map_as_JSON` that is a proxy URL of a route
//! becomes the upstream URL again, and each layer under a route with a
//! credential gets that credential's token (`"token"`). Layers outside every
//! route are left alone. The tokens used are scrubbed from the answer like
//! the request's own.

use std::sync::Arc;

use serde_json::Value;
use url::Url;

use super::Proxy;
use crate::error::ProxyError;
use crate::policy::path;
use crate::token::Token;

/// The parameter print tasks take the map in (matched without regard to
/// case, as ArcGIS matches parameter names).
const PARAM: &str = "Web_Map_as_JSON";

impl Proxy {
    /// Rewrites the `Web_Map_as_JSON` of a print request, in the query or a
    /// form body; the tokens put into it, for scrubbing the answer.
    pub(super) async fn print_layers(
        &self,
        parts: &http::request::Parts,
        target: &mut super::target::Target<'_>,
        body: &mut super::body::RequestBody,
        app: usize,
        conn: &super::ConnInfo,
    ) -> Result<Vec<Arc<Token>>, ProxyError> {
        let in_query = target.query.as_deref().is_some_and(mentions_web_map);
        let in_body = body.kept_text().is_some_and(mentions_web_map);
        if !in_query && !in_body {
            return Ok(Vec::new());
        }
        let base = self.public_base(&parts.headers, &parts.uri, conn);
        let mut used = Vec::new();
        if in_query
            && let Some(q) = target.query.as_deref()
            && let Some((new, tokens)) = self.rewrite_web_map(q, &base, app).await?
        {
            target.query = Some(std::borrow::Cow::Owned(new));
            used.extend(tokens);
        }
        if in_body
            && let Some(form) = body.kept_text()
            && let Some((new, tokens)) = self.rewrite_web_map(form, &base, app).await?
        {
            body.replace_kept(bytes::Bytes::from(new));
            used.extend(tokens);
        }
        Ok(used)
    }

    /// `form` (a query string or form body) with its `Web_Map_as_JSON`
    /// rewritten, and the tokens put into it; `None` when there is no such
    /// parameter or nothing in it changed.
    pub(super) async fn rewrite_web_map(
        &self,
        form: &str,
        public_base: &str,
        app: usize,
    ) -> Result<Option<(String, Vec<Arc<Token>>)>, ProxyError> {
        if !mentions_web_map(form) {
            return Ok(None);
        }
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        let Some(i) = pairs
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(PARAM))
        else {
            return Ok(None);
        };
        let Ok(mut map) = serde_json::from_str::<Value>(&pairs[i].1) else {
            // Not JSON: the print service will say so; nothing to rewrite.
            return Ok(None);
        };
        // First pass: proxy URLs back to upstream URLs, and which credential
        // each layer needs (the map is dropped if a token cannot be had).
        let mut changed = false;
        let mut needed: Vec<&str> = Vec::new();
        visit(&mut map, &mut |layer| {
            for field in ["url", "styleUrl"] {
                let Some(Value::String(u)) = layer.get(field) else {
                    continue;
                };
                if let Some(up) = self.upstream_of(u, public_base) {
                    layer.insert(field.to_string(), Value::String(up));
                    changed = true;
                }
            }
            if let Some(Value::String(u)) = layer.get("url")
                && let Some(cred) = self.credential_of(u, app)
                && !needed.contains(&cred)
            {
                needed.push(cred);
            }
        });
        let mut tokens: Vec<(&str, Arc<Token>)> = Vec::new();
        for cred in needed {
            if let Some(src) = self.tokens.get(cred) {
                tokens.push((cred, src.token().await?));
            }
        }
        // Second pass: each layer under a credential's route gets its token.
        visit(&mut map, &mut |layer| {
            if let Some(Value::String(u)) = layer.get("url")
                && let Some(cred) = self.credential_of(u, app)
                && let Some((_, t)) = tokens.iter().find(|(c, _)| *c == cred)
            {
                layer.insert("token".into(), Value::String(t.expose().to_string()));
                changed = true;
            }
        });
        let tokens: Vec<Arc<Token>> = tokens.into_iter().map(|(_, t)| t).collect();
        if !changed {
            return Ok(None);
        }
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        for (j, (k, v)) in pairs.iter().enumerate() {
            if j == i {
                out.append_pair(k, &map.to_string());
            } else {
                out.append_pair(k, v);
            }
        }
        Ok(Some((out.finish(), tokens)))
    }

    /// The credential whose token a layer at upstream URL `u` needs: its
    /// route's, or what `app` uses in its place; `None` outside every route
    /// or on a route without one.
    fn credential_of(&self, u: &str, app: usize) -> Option<&str> {
        let url = Url::parse(u).ok()?;
        let own = self.config.routes.by_url(&url)?.credential.as_deref()?;
        Some(self.config.apps.credential_for(app, own))
    }

    /// The upstream URL a proxy URL stands for: `<base><mount>/…` or
    /// `<base><proxy_path>?<url>`; `None` for any other URL.
    fn upstream_of(&self, u: &str, public_base: &str) -> Option<String> {
        let rest = u.strip_prefix(public_base)?;
        let proxy_path = &self.config.server.proxy_path;
        if let Some(target) = rest
            .strip_prefix(proxy_path.as_str())
            .and_then(|r| r.strip_prefix('?'))
        {
            let url = path::parse_target(target).ok()?;
            return self.config.routes.by_url(&url).map(|_| url.to_string());
        }
        let (path_part, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let normalised = path::normalise_path(path_part).ok()?;
        let (route, tail) = self.config.routes.by_mount(&normalised)?;
        let mut up = String::from(route.origin());
        route.push_upstream_path(tail, &mut up);
        if let Some(q) = query {
            up.push('?');
            up.push_str(q);
        }
        Some(up)
    }
}

/// A cheap look for the parameter name, so ordinary requests are not parsed.
pub(super) fn mentions_web_map(form: &str) -> bool {
    let b = form.as_bytes();
    memchr::memchr2_iter(b'W', b'w', b).any(|i| {
        b.get(i..i + PARAM.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(PARAM.as_bytes()))
    })
}

/// Calls `f` with every layer object of a web map: `operationalLayers[]`,
/// `baseMap.baseMapLayers[]`, and the `layers[]` nested in either, at any
/// depth (bounded, against a hostile document).
fn visit(map: &mut Value, f: &mut dyn FnMut(&mut serde_json::Map<String, Value>)) {
    fn walk(list: &mut Value, f: &mut dyn FnMut(&mut serde_json::Map<String, Value>), depth: u8) {
        let Value::Array(items) = list else { return };
        if depth > 16 {
            return;
        }
        for item in items {
            let Value::Object(obj) = item else { continue };
            f(obj);
            if let Some(nested) = obj.get_mut("layers") {
                walk(nested, f, depth + 1);
            }
        }
    }
    let Value::Object(root) = map else { return };
    if let Some(ops) = root.get_mut("operationalLayers") {
        walk(ops, f, 0);
    }
    if let Some(Value::Object(base)) = root.get_mut("baseMap")
        && let Some(layers) = base.get_mut("baseMapLayers")
    {
        walk(layers, f, 0);
    }
}
