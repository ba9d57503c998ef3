//! Integration tests: a real server on 127.0.0.1:0, real sockets, exact wire bytes.
//! Run with RINGWIRE_TEST_DRIVER=epoll to put every shard on the epoll driver.

mod cluster;
mod cluster_faults;
mod cluster_nodes;
mod cluster_presence;
mod cluster_users;
mod cluster_watch;
mod dashboard;
mod doctor;
mod hostile;
mod http_api;
mod presence;
mod process;
mod reload;
mod support;
mod tidy;
mod tls;
mod webhooks;
mod websocket;
