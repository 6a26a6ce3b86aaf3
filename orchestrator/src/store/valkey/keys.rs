//! The key layout: every key of one registration carries its slot tag in braces, so in
//! Valkey Cluster all of them share a slot (see `docs/valkey-store.md`).

use std::sync::Arc;

use ulid::Ulid;

use crate::store::{id_tag, url_tag};

/// Crockford base32, the ULID text alphabet.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Renders a 15-bit slot tag exactly as the last three characters of a ULID whose lowest 15
/// bits are `tag`.
pub fn tag_text(tag: u16) -> String {
    let t = usize::from(tag & 0x7fff);
    [t >> 10, (t >> 5) & 31, t & 31]
        .iter()
        .map(|&i| char::from(CROCKFORD[i]))
        .collect()
}

/// A registration's keys and the shared index keys for one prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: Arc<str>,
}

impl Keys {
    pub(super) fn svc(&self, id: Ulid) -> String {
        format!("{}{{{}}}:svc:{id}", self.prefix, tag_text(id_tag(id)))
    }

    pub(super) fn url(&self, url: &str) -> String {
        format!("{}{{{}}}:url:{url}", self.prefix, tag_text(url_tag(url)))
    }

    /// The URL key of `id`'s registration without the URL: scripts append the URL they read
    /// from the record.
    pub(super) fn url_prefix_of(&self, id: Ulid) -> String {
        format!("{}{{{}}}:url:", self.prefix, tag_text(id_tag(id)))
    }

    /// The tombstone of `id`'s last deregistration.
    pub(super) fn gone(&self, id: Ulid) -> String {
        format!("{}{{{}}}:gone:{id}", self.prefix, tag_text(id_tag(id)))
    }

    pub(super) fn all_idx(&self) -> String {
        format!("{}{{all}}:idx", self.prefix)
    }

    pub(super) fn name_idx(&self, name: &str) -> String {
        format!("{}{{n:{name}}}:idx", self.prefix)
    }

    pub(super) fn names(&self) -> String {
        format!("{}{{all}}:names", self.prefix)
    }

    /// The change log: a stream in the all-index's slot, so one script can drop an index
    /// entry, settle its announcement and log the change together.
    pub(super) fn events(&self) -> String {
        format!("{}{{all}}:events", self.prefix)
    }

    /// The ids the change log announced and whose removal it has not logged yet, with what it
    /// knows of them (see `lua/announce.lua`).
    pub(super) fn announced(&self) -> String {
        format!("{}{{all}}:announced", self.prefix)
    }

    /// The live health-checker replicas, scored by the deadline of their last announcement
    /// (see `lua/checkers.lua`).
    pub(super) fn checkers(&self) -> String {
        format!("{}{{all}}:checkers", self.prefix)
    }

    /// The health check's test key of one orchestrator (`instance`). In the slot of the
    /// all-index, which every registration writes: if that node refuses writes, so does
    /// every register. One key per orchestrator, expiring on its own.
    pub(super) fn health(&self, instance: Ulid) -> String {
        format!("{}{{all}}:health:{instance}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mint_id;

    #[test]
    fn tag_text_matches_the_last_three_id_characters() {
        for tag in [0u16, 1, 31, 32, 1023, 1024, 0x5555, 0x7fff] {
            let id = Ulid(u128::from(tag));
            assert_eq!(tag_text(tag), id.to_string()[23..], "tag {tag}");
        }
        for url in ["http://a:1", "https://b.example/x", "http://svc:8000"] {
            let id = mint_id(url);
            assert_eq!(tag_text(url_tag(url)), id.to_string()[23..]);
        }
    }

    #[test]
    fn keys_of_one_registration_share_a_tag() {
        let keys = Keys {
            prefix: Arc::from("p:"),
        };
        let url = "http://svc:8000";
        let id = mint_id(url);
        let tag = &id.to_string()[23..];
        assert_eq!(keys.svc(id), format!("p:{{{tag}}}:svc:{id}"));
        assert_eq!(keys.url(url), format!("p:{{{tag}}}:url:{url}"));
        assert_eq!(keys.url_prefix_of(id) + url, keys.url(url));
        assert_eq!(keys.gone(id), format!("p:{{{tag}}}:gone:{id}"));
        assert_eq!(keys.name_idx("A"), "p:{n:A}:idx");
        assert_eq!(keys.all_idx(), "p:{all}:idx");
        assert_eq!(keys.names(), "p:{all}:names");
        assert_eq!(keys.events(), "p:{all}:events");
        assert_eq!(keys.announced(), "p:{all}:announced");
        assert_eq!(keys.checkers(), "p:{all}:checkers");
    }
}
