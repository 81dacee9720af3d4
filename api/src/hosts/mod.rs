//! Hosts: the machines of one hearth, as one cloud. Each api registers the host it runs
//! on (`hosts/<name>`: its address, its daemons' TLS endpoints, capacity, versions)
//! and holds a lease on `hosts-alive/<name>` renewed every second; one api, elected
//! through a lease on `leader`, notices a host whose lease lapsed and marks it lost.
//! VMs are placed on hosts by the scheduler ([`hearth_placement`], fed by
//! [`schedule`]) and reached through their host's daemons ([`daemons`]).

pub mod clients;
pub mod daemons;
pub mod error;
pub mod evacuate;
pub mod http;
pub mod join;
pub mod presence;
pub mod record;
pub mod schedule;
pub mod view;
