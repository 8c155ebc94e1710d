//! The broker subscriptions: one per distinct filter of the models' input
//! topics, each with its own subscription identifier and No Local, kept in
//! step with the model set (changes sent at once when connected, all again
//! on every CONNACK), refusals reported, and overlapping copies of one
//! message (one per matching subscription) taken once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::v5::mqttbytes::v5::{Filter, SubscribeProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Client;

use crate::topic::TopicFilter;

/// The input filters the service wants, kept in step with the broker: set
/// on every CONNACK and changed at run time when model configs come and go.
///
/// Each filter is subscribed with a subscription identifier of its own, so a
/// frame that matches several overlapping filters is taken once: a broker may
/// deliver one copy per matching subscription (mosquitto does); the copy that
/// carries the lowest matching identifier is the one processed, the others are
/// acknowledged and counted. Filters are subscribed with No Local, so the
/// service never receives what it publishes.
pub struct Subscriptions {
    inner: Mutex<SubState>,
}

struct Sub {
    filter: String,
    parsed: Option<TopicFilter>,
    id: usize,
}

struct SubState {
    wanted: Vec<Sub>,
    next_id: usize,
    client: Option<Client>,
    /// Filters of SUBSCRIBEs awaiting their SUBACK, oldest first.
    sent: VecDeque<String>,
}

impl Subscriptions {
    pub fn new(wanted: Vec<String>) -> Arc<Subscriptions> {
        let mut st = SubState {
            wanted: Vec::new(),
            next_id: 1,
            client: None,
            sent: VecDeque::new(),
        };
        for f in wanted {
            st.want(f);
        }
        Arc::new(Subscriptions { inner: Mutex::new(st) })
    }

    /// Changes the wanted filters; subscribes to the new ones and unsubscribes
    /// from the dropped ones now when connected (else on the next CONNACK).
    pub fn set(&self, wanted: Vec<String>) {
        let mut st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let removed: Vec<String> = st
            .wanted
            .iter()
            .filter(|s| !wanted.contains(&s.filter))
            .map(|s| s.filter.clone())
            .collect();
        st.wanted.retain(|s| wanted.contains(&s.filter));
        let added: Vec<usize> = wanted
            .into_iter()
            .filter_map(|f| (!st.wanted.iter().any(|s| s.filter == f)).then(|| st.want(f)))
            .collect();
        if let Some(client) = st.client.clone() {
            for f in &removed {
                log::info!("unsubscribing from `{f}`: no model reads it any more");
                if let Err(e) = client.try_unsubscribe(f.as_str()) {
                    log::error!("cannot unsubscribe from `{f}`: {e}");
                }
            }
            if !added.is_empty() {
                let names: Vec<&str> = added.iter().map(|&i| st.wanted[i].filter.as_str()).collect();
                log::info!("subscribing to {names:?} for a new model");
            }
            for i in added {
                st.subscribe(&client, i);
            }
        }
    }

    /// Whether a delivery on `topic` that came for subscriptions `ids` is the
    /// copy to process (see the type's comment). A broker that sends no
    /// identifiers sends one copy.
    pub fn first_copy(&self, topic: &str, ids: &[usize]) -> bool {
        if ids.is_empty() {
            return true;
        }
        let st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lowest = st
            .wanted
            .iter()
            .filter(|s| s.parsed.as_ref().is_some_and(|f| f.matches(topic)))
            .map(|s| s.id)
            .min();
        lowest.is_none_or(|id| ids.contains(&id))
    }

    pub(super) fn on_connack(&self, client: &Client) {
        let mut st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.client = Some(client.clone());
        st.sent.clear();
        for i in 0..st.wanted.len() {
            st.subscribe(client, i);
        }
    }

    /// Reports a filter the broker refused (an ACL, a bad filter); returns how many.
    pub(super) fn on_suback(&self, codes: &[SubscribeReasonCode]) -> usize {
        let filter = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sent
            .pop_front()
            .unwrap_or_default();
        let mut refused = 0;
        for code in codes {
            if !matches!(code, SubscribeReasonCode::Success(_)) {
                refused += 1;
                log::error!(
                    "broker refused the subscription to `{filter}`: {code:?} (is it outside this client's ACL?)"
                );
            }
        }
        refused
    }
}

impl SubState {
    /// Adds `filter` with a fresh identifier; returns its index.
    fn want(&mut self, filter: String) -> usize {
        let parsed = TopicFilter::parse(&filter).ok();
        self.wanted.push(Sub {
            filter,
            parsed,
            id: self.next_id,
        });
        // Identifiers run 1..=268_435_455 in MQTT v5.
        self.next_id = self.next_id % 268_435_455 + 1;
        self.wanted.len() - 1
    }

    fn subscribe(&mut self, client: &Client, i: usize) {
        let s = &self.wanted[i];
        let props = SubscribeProperties {
            id: Some(s.id),
            user_properties: Vec::new(),
        };
        let mut filter = Filter::new(s.filter.clone(), QoS::AtLeastOnce);
        // Never take our own results as input, even when an input filter covers
        // an output topic. (MQTT forbids No Local on shared subscriptions.)
        filter.nolocal = !s.filter.starts_with("$share/");
        match client.try_subscribe_many_with_properties([filter], props) {
            Ok(()) => self.sent.push_back(s.filter.clone()),
            Err(e) => log::error!("cannot subscribe to `{}`: {e}", s.filter),
        }
    }
}
