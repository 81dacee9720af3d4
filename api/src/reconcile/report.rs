//! What a reconcile pass found and repaired, and the totals `/metrics` shows.

/// What one pass did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub creates_undone: Vec<String>,
    pub deletes_finished: Vec<String>,
    pub orphan_vmms: Vec<String>,
    pub orphan_ports: Vec<String>,
    pub orphan_root_disks: Vec<String>,
    /// Base volumes of images that no longer exist (LVM and memory pools).
    pub orphan_image_bases: Vec<String>,
    pub orphan_claims: Vec<String>,
    /// Remote disks an earlier api process made for a moment (to check or grow a
    /// remote volume) and left when it ended.
    pub orphan_remote_disks: Vec<String>,
    /// VMs vmm-manager had lost, defined again (and started when wanted running).
    pub redefined: Vec<String>,
    pub restarted: Vec<String>,
    /// VMs vmm-manager had lost that could not be defined again, with why.
    pub not_redefined: Vec<String>,
    /// Networks and volumes (`<project>/<name>`) whose create or delete a crash cut
    /// short, removed completely.
    pub networks_removed: Vec<String>,
    pub volumes_removed: Vec<String>,
    /// Networks (`<project>/<name>`) netd had lost, made again from their records.
    pub networks_recreated: Vec<String>,
    /// VM names (`<project>/<name>`) a crash left claimed by no VM, freed.
    pub names_freed: Vec<String>,
    /// Sagas (by operation id) an earlier api process left: finished (resumed past their
    /// pivot), undone, resumed in a task (long ones: an import following its job), or
    /// not settled yet (with why).
    pub sagas_finished: Vec<String>,
    pub sagas_undone: Vec<String>,
    #[serde(default)]
    pub sagas_resumed: Vec<String>,
    pub sagas_stuck: Vec<String>,
    /// How many records and daemon objects the pass looked at.
    #[serde(skip)]
    pub examined: usize,
}

/// Totals of the periodic passes, for `/metrics`.
#[derive(Debug, Default)]
pub struct Totals {
    pub passes: std::sync::atomic::AtomicU64,
    pub repairs: std::sync::atomic::AtomicU64,
}

/// The figures of the pass at start, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    pub seconds: f64,
    pub examined: usize,
    pub repairs: usize,
}

impl Report {
    /// How many things the pass changed.
    pub fn repairs(&self) -> usize {
        self.creates_undone.len()
            + self.deletes_finished.len()
            + self.orphan_vmms.len()
            + self.orphan_ports.len()
            + self.orphan_root_disks.len()
            + self.orphan_image_bases.len()
            + self.orphan_claims.len()
            + self.orphan_remote_disks.len()
            + self.redefined.len()
            + self.networks_removed.len()
            + self.volumes_removed.len()
            + self.names_freed.len()
            + self.networks_recreated.len()
            + self.sagas_finished.len()
            + self.sagas_undone.len()
            + self.sagas_resumed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.creates_undone.is_empty()
            && self.deletes_finished.is_empty()
            && self.orphan_vmms.is_empty()
            && self.orphan_ports.is_empty()
            && self.orphan_root_disks.is_empty()
            && self.orphan_image_bases.is_empty()
            && self.orphan_claims.is_empty()
            && self.orphan_remote_disks.is_empty()
            && self.redefined.is_empty()
            && self.not_redefined.is_empty()
            && self.networks_removed.is_empty()
            && self.volumes_removed.is_empty()
            && self.names_freed.is_empty()
            && self.networks_recreated.is_empty()
            && self.sagas_finished.is_empty()
            && self.sagas_undone.is_empty()
            && self.sagas_resumed.is_empty()
            && self.sagas_stuck.is_empty()
    }
}
