//! A stand-in for the Kubernetes API server, for the tests only: no API server can be
//! installed from the package registries this project builds from. It serves what
//! velox-loader uses, over plain HTTP, the way the real one does: list with a
//! `resourceVersion`, watch from one (history first, then live events, bookmarks),
//! `410 Gone` for a version older than its history, `403 Forbidden` for a resource
//! a test forbids, and status patches of Nodes. A switch makes it unreachable.
//!
//! It runs on a thread of its own inside a network namespace (the nodes' underlay),
//! so loaders in node namespaces reach it at an address of that namespace.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// A resource the stand-in serves: its URL path segment and its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    /// `nodes`, `services`, ...
    pub plural: &'static str,
    pub kind: &'static str,
    /// `v1`, or `group/version`.
    pub api_version: &'static str,
}

pub const NODES: Resource = Resource {
    plural: "nodes",
    kind: "Node",
    api_version: "v1",
};
pub const SERVICES: Resource = Resource {
    plural: "services",
    kind: "Service",
    api_version: "v1",
};
pub const ENDPOINT_SLICES: Resource = Resource {
    plural: "endpointslices",
    kind: "EndpointSlice",
    api_version: "discovery.k8s.io/v1",
};
pub const PODS: Resource = Resource {
    plural: "pods",
    kind: "Pod",
    api_version: "v1",
};
pub const NAMESPACES: Resource = Resource {
    plural: "namespaces",
    kind: "Namespace",
    api_version: "v1",
};
pub const NETWORK_POLICIES: Resource = Resource {
    plural: "networkpolicies",
    kind: "NetworkPolicy",
    api_version: "networking.k8s.io/v1",
};
const RESOURCES: [Resource; 6] = [NODES, SERVICES, ENDPOINT_SLICES, PODS, NAMESPACES, NETWORK_POLICIES];

/// One request as RBAC sees it: API group, resource (with `/status` for a
/// subresource), verb.
pub type Access = (String, String, String);

#[derive(Clone, Debug)]
struct Event {
    resource: Resource,
    kind: &'static str,
    object: Value,
    version: u64,
}

#[derive(Default)]
struct State {
    version: u64,
    /// (resource plural, namespace, name) -> the object, with its resourceVersion.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Event>,
    /// Watches from a version below this one get 410 Gone.
    oldest_watchable: u64,
    forbidden: BTreeSet<&'static str>,
    /// The API version each resource is served under when it is not its own
    /// (`None`: not served at all, 404).
    served_as: BTreeMap<&'static str, Option<&'static str>>,
    requests: Vec<Access>,
}

impl State {
    /// The API version `resource` is served under, if at all.
    fn served(&self, resource: Resource) -> Option<&'static str> {
        self.served_as
            .get(resource.plural)
            .copied()
            .unwrap_or(Some(resource.api_version))
    }
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Whether the server answers at all; flipping it to false drops every connection.
    reachable: watch::Sender<bool>,
    /// Bumped to end every open watch (a compaction, as etcd does).
    epoch: watch::Sender<u64>,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts serving on `ip` (a port of its own) inside the network namespace `netns`.
    pub fn start(netns: &str, ip: IpAddr) -> anyhow::Result<Self> {
        let netns_file =
            std::fs::File::open(crate::netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events: broadcast::channel(4096).0,
            reachable: watch::channel(true).0,
            epoch: watch::channel(0).0,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || {
                let setup = (|| -> anyhow::Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                    nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
                    listener.set_nonblocking(true)?;
                    Ok((runtime, listener))
                })();
                let (runtime, listener) = match setup {
                    Ok(ok) => ok,
                    Err(e) => return drop(bound.send(Err(e))),
                };
                let _ = bound.send(listener.local_addr().map_err(anyhow::Error::from));
                runtime.block_on(serve(shared, listener, stopped));
            }
        });
        let addr = bound_rx.recv().context("the API server thread died")??;
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server, without credentials.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url()}}],
            "users": [{"name": "velox", "user": {}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "velox"}}],
            "current-context": "stand-in",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    /// Creates or replaces an object (its kind says which resource).
    pub fn apply(&self, mut object: Value) -> anyhow::Result<()> {
        let resource = resource_of(&object)?;
        let mut state = self.shared.state.lock().unwrap();
        state.version += 1;
        let version = state.version;
        object["apiVersion"] = json!(resource.api_version);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = key_of(resource, &object);
        let kind = match state.objects.insert(key, object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        publish(&self.shared, &mut state, resource, kind, object);
        Ok(())
    }

    /// Deletes an object; absent is fine.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut state = self.shared.state.lock().unwrap();
        if let Some(mut object) = state
            .objects
            .remove(&(resource.plural, namespace.to_string(), name.to_string()))
        {
            state.version += 1;
            object["metadata"]["resourceVersion"] = json!(state.version.to_string());
            publish(&self.shared, &mut state, resource, "DELETED", object);
        }
    }

    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .get(&(resource.plural, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Stops answering (every connection dropped, new ones refused), or answers again.
    pub fn set_reachable(&self, reachable: bool) {
        self.shared.reachable.send_replace(reachable);
    }

    /// Answers every request for `resource` with 403 Forbidden, as RBAC does.
    pub fn forbid(&self, resource: Resource) {
        self.shared.state.lock().unwrap().forbidden.insert(resource.plural);
    }

    /// Serves `resource` under `api_version` only (as Kubernetes 1.20 serves
    /// EndpointSlices as `discovery.k8s.io/v1beta1`), or not at all (`None`): any
    /// other version answers 404, as for a resource the server does not know.
    pub fn serve_as(&self, resource: Resource, api_version: Option<&'static str>) {
        self.shared
            .state
            .lock()
            .unwrap()
            .served_as
            .insert(resource.plural, api_version);
    }

    /// Answers requests for `resource` again, as RBAC does once a role grants them.
    pub fn allow(&self, resource: Resource) {
        self.shared.state.lock().unwrap().forbidden.remove(resource.plural);
    }

    /// Forgets the history, as a compaction after other writes does, and ends every open watch: a
    /// client that watches again from an older version gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.history.clear();
        // As etcd's revision, which writes to anything move on: every client's
        // version is now older than the oldest watchable one, while a list made after
        // the compaction watches on (410 Gone once, not on every try).
        state.version += 1;
        state.oldest_watchable = state.version;
        drop(state);
        self.shared.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Every (verb, resource) asked for so far.
    pub fn requests(&self) -> BTreeSet<Access> {
        self.shared.state.lock().unwrap().requests.iter().cloned().collect()
    }

    /// How many requests of `verb` on `resource` came so far.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        let state = self.shared.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|(_, r, v)| v == verb && r == resource)
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn publish(shared: &Shared, state: &mut State, resource: Resource, kind: &'static str, object: Value) {
    let event = Event {
        resource,
        kind,
        object,
        version: state.version,
    };
    state.history.push(event.clone());
    let _ = shared.events.send(event);
}

fn resource_of(object: &Value) -> anyhow::Result<Resource> {
    let kind = object["kind"].as_str().context("an object without kind")?;
    RESOURCES
        .into_iter()
        .find(|r| r.kind == kind)
        .with_context(|| format!("the stand-in does not serve {kind}"))
}

fn key_of(resource: Resource, object: &Value) -> (&'static str, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        resource.plural,
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

async fn serve(shared: Arc<Shared>, listener: std::net::TcpListener, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let addr = listener.local_addr().expect("bound");
    let mut listener = Some(tokio::net::TcpListener::from_std(listener).expect("a tokio listener"));
    let mut reachable = shared.reachable.subscribe();
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stopped => return,
            changed = reachable.changed() => {
                if changed.is_err() {
                    return;
                }
                // Down: the port is closed, connects are refused; up: bound again.
                listener = match *reachable.borrow_and_update() {
                    false => None,
                    true => tokio::net::TcpListener::bind(addr).await.ok(),
                };
            }
            Some((stream, _)) = accept => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut reachable = shared.reachable.subscribe();
                    let service = hyper::service::service_fn(move |request| answer(shared.clone(), request));
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = reachable.wait_for(|up| !up) => {}
                    }
                });
            }
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    json_response(StatusCode::from_u16(code).expect("a status code"), &body)
}

/// A request's target: the API version asked for, the resource, the object's name
/// and subresource.
struct Route {
    api_version: String,
    resource: Resource,
    name: Option<String>,
    subresource: Option<String>,
}

/// The request's target, from its path.
fn route(path: &str) -> Option<Route> {
    let (api_version, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("v1".to_string(), rest),
        None => {
            let mut parts = path.strip_prefix("/apis/")?.splitn(3, '/');
            let (group, version, rest) = (parts.next()?, parts.next()?, parts.next()?);
            (format!("{group}/{version}"), rest)
        }
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    if parts.first() == Some(&"namespaces") && parts.len() >= 3 {
        parts.drain(..2);
    }
    let resource = RESOURCES.into_iter().find(|r| r.plural == parts[0])?;
    Some(Route {
        api_version,
        resource,
        name: parts.get(1).map(|s| s.to_string()),
        subresource: parts.get(2).map(|s| s.to_string()),
    })
}

/// `object` as the API version `served` shows it: an EndpointSlice of
/// `discovery.k8s.io/v1beta1` has its endpoints' node and zone in `topology`.
fn as_served(object: &Value, served: &str) -> Value {
    let mut object = object.clone();
    if object["apiVersion"] == served {
        return object;
    }
    object["apiVersion"] = json!(served);
    if served == "discovery.k8s.io/v1beta1" {
        for endpoint in object["endpoints"].as_array_mut().into_iter().flatten() {
            let mut topology = serde_json::Map::new();
            for (field, label) in [
                ("nodeName", "kubernetes.io/hostname"),
                ("zone", "topology.kubernetes.io/zone"),
            ] {
                if let Some(value) = endpoint.as_object_mut().and_then(|e| e.remove(field)) {
                    topology.insert(label.to_string(), value);
                }
            }
            endpoint["topology"] = Value::Object(topology);
        }
    }
    object
}

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let not_found = || status(404, "NotFound", format!("the stand-in serves no {path}"));
    let Some(Route {
        api_version,
        resource,
        name,
        subresource,
    }) = route(&path)
    else {
        return Ok(not_found());
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (request.method(), &name, watching) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, Some(_), false) => "get",
        (&Method::GET, None, false) => "list",
        (&Method::PATCH, Some(_), _) => "patch",
        (method, _, _) => return Ok(status(405, "MethodNotAllowed", format!("{method} {path}"))),
    };
    let rbac_resource = match &subresource {
        Some(sub) => format!("{}/{sub}", resource.plural),
        None => resource.plural.to_string(),
    };
    {
        let mut state = shared.state.lock().unwrap();
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        state
            .requests
            .push((group.to_string(), rbac_resource.clone(), verb.to_string()));
        if state.served(resource) != Some(api_version.as_str()) {
            return Ok(not_found());
        }
        if state.forbidden.contains(resource.plural) {
            let message = format!(
                "{rbac_resource} is forbidden: User \"system:serviceaccount:kube-system:velox\" cannot {verb} \
                 resource \"{rbac_resource}\" at the cluster scope"
            );
            return Ok(status(403, "Forbidden", message));
        }
    }
    Ok(match verb {
        "list" => list(&shared, resource, &api_version),
        "get" => get(&shared, resource, &api_version, name.as_deref().unwrap_or_default()),
        "patch" => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            patch_status(&shared, resource, name.as_deref().unwrap_or_default(), &body)
        }
        _ => watch_response(&shared, resource, api_version, &query),
    })
}

fn list(shared: &Shared, resource: Resource, served: &str) -> Response<Body> {
    let state = shared.state.lock().unwrap();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((plural, _, _), _)| *plural == resource.plural)
        .map(|(_, object)| as_served(object, served))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": served,
            "metadata": {"resourceVersion": state.version.to_string()},
            "items": items,
        }),
    )
}

fn get(shared: &Shared, resource: Resource, served: &str, name: &str) -> Response<Body> {
    let state = shared.state.lock().unwrap();
    let found = state
        .objects
        .iter()
        .find(|((plural, _, n), _)| *plural == resource.plural && n == name);
    match found {
        Some((_, object)) => json_response(StatusCode::OK, &as_served(object, served)),
        None => status(404, "NotFound", format!("{} \"{name}\" not found", resource.plural)),
    }
}

/// A merge of `status.conditions` by type, the way the strategic merge patch that
/// kubelet and network plugins send is applied to a Node.
fn patch_status(shared: &Shared, resource: Resource, name: &str, body: &[u8]) -> Response<Body> {
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the patch is not JSON".into());
    };
    let mut state = shared.state.lock().unwrap();
    let key = (resource.plural, String::new(), name.to_string());
    let Some(mut object) = state.objects.get(&key).cloned() else {
        return status(404, "NotFound", format!("{} \"{name}\" not found", resource.plural));
    };
    let patched = patch["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut merged: Vec<Value> = conditions
        .into_iter()
        .filter(|c| !patched.iter().any(|p| p["type"] == c["type"]))
        .collect();
    merged.extend(patched);
    object["status"]["conditions"] = Value::Array(merged);
    state.version += 1;
    object["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state.objects.insert(key, object.clone());
    publish(shared, &mut state, resource, "MODIFIED", object.clone());
    json_response(StatusCode::OK, &object)
}

fn watch_response(
    shared: &Arc<Shared>,
    resource: Resource,
    served: String,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300));
    let (sender, receiver) = tokio::sync::mpsc::channel::<Value>(1024);
    let (backlog, mut live, expired) = {
        let state = shared.state.lock().unwrap();
        let expired = from != 0 && from < state.oldest_watchable;
        let backlog: Vec<Event> = state
            .history
            .iter()
            .filter(|e| e.resource == resource && e.version > from)
            .cloned()
            .collect();
        (backlog, shared.events.subscribe(), expired)
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        if expired {
            let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410});
            let _ = sender.send(json!({"type": "ERROR", "object": gone})).await;
            return;
        }
        let event_json = |e: &Event| json!({"type": e.kind, "object": as_served(&e.object, &served)});
        for event in &backlog {
            if sender.send(event_json(event)).await.is_err() {
                return;
            }
        }
        let mut epoch = shared.epoch.subscribe();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = epoch.changed() => return,
                _ = &mut deadline => return,
                event = live.recv() => match event {
                    Ok(event) if event.resource == resource && event.version > from => {
                        if sender.send(event_json(&event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return, // lagged: the client lists again
                },
                _ = bookmark.tick(), if bookmarks => {
                    let version = shared.state.lock().unwrap().version;
                    let object = json!({"kind": resource.kind, "apiVersion": served,
                        "metadata": {"resourceVersion": version.to_string()}});
                    if sender.send(json!({"type": "BOOKMARK", "object": object})).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let lines = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        let line = Bytes::from(format!("{event}\n"));
        Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(lines)))
        .expect("a valid response")
}
