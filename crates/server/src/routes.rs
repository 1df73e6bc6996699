//! The route table. The router is built from it, the authorization layer
//! reads each route's [`Access`] from it and the OpenAPI test reads it, so
//! no route can be served without a declared access or without the test
//! seeing it.

use std::collections::{BTreeMap, HashMap};

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use rollwave_core::Access;

/// Routes as they are added: each method and path with its handler.
pub(crate) struct Routes<S> {
    entries: Vec<(Method, &'static str, Access, MethodRouter<S>)>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Routes {
            entries: Vec::new(),
        }
    }

    pub fn get<H: Handler<T, S>, T: 'static>(
        self,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self {
        self.add(Method::GET, MethodFilter::GET, path, access, handler)
    }

    pub fn delete<H: Handler<T, S>, T: 'static>(
        self,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self {
        self.add(Method::DELETE, MethodFilter::DELETE, path, access, handler)
    }

    pub fn post<H: Handler<T, S>, T: 'static>(
        self,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self {
        self.add(Method::POST, MethodFilter::POST, path, access, handler)
    }

    fn add<H: Handler<T, S>, T: 'static>(
        mut self,
        method: Method,
        filter: MethodFilter,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self {
        self.entries
            .push((method, path, access, on(filter, handler)));
        self
    }

    /// Every `(method, path)` served, in the order added.
    #[cfg(test)]
    pub fn table(&self) -> Vec<(Method, &'static str)> {
        self.entries
            .iter()
            .map(|(method, path, _, _)| (method.clone(), *path))
            .collect()
    }

    /// The access each `(method, path)` needs.
    pub fn access_table(&self) -> HashMap<(Method, &'static str), Access> {
        self.entries
            .iter()
            .map(|(method, path, access, _)| ((method.clone(), *path), *access))
            .collect()
    }

    /// One axum route per path with all of its methods. Panics, as axum
    /// does, if a method is added twice to the same path.
    pub fn into_router(self) -> Router<S> {
        let mut by_path: BTreeMap<&'static str, MethodRouter<S>> = BTreeMap::new();
        for (_, path, _, handler) in self.entries {
            let merged = match by_path.remove(path) {
                Some(methods) => methods.merge(handler),
                None => handler,
            };
            by_path.insert(path, merged);
        }
        by_path
            .into_iter()
            .fold(Router::new(), |router, (path, methods)| {
                router.route(path, methods)
            })
    }
}
