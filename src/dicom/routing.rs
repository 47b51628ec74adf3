//! Which model, if any, analyses a stored instance. Rules from the configuration are tried in
//! order; the first whose every given criterion matches wins. Objects without pixels, non-image
//! SOP classes and unmatched instances are stored but not analysed, with the reason recorded.

use serde::{Deserialize, Serialize};

use super::parse::{is_image_storage, InstanceIndex};

/// One routing rule (`[[dicom.routes]]` in `carina.toml`). Empty lists match anything;
/// values compare case-insensitively; `""` in a list matches an absent attribute.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Route {
    /// Model name (an image model in the registry).
    pub model: String,
    /// Modality (0008,0060) values, e.g. `["CR", "DX"]`.
    pub modality: Vec<String>,
    /// Body Part Examined (0018,0015) values, e.g. `["CHEST", ""]`.
    pub body_part: Vec<String>,
    /// View Position (0018,5101) values, e.g. `["PA", "AP"]`.
    pub view_position: Vec<String>,
    /// SOP Class UIDs.
    pub sop_class: Vec<String>,
    /// Frame analysed in multi-frame images (1-based; default 1).
    pub frame: Option<u32>,
}

/// The routes used when none are configured: chest radiographs (CR/DX, chest or unknown body
/// part) go to `model`.
pub fn default_routes(model: &str) -> Vec<Route> {
    vec![Route {
        model: model.to_string(),
        modality: vec!["CR".into(), "DX".into()],
        body_part: vec!["CHEST".into(), String::new()],
        ..Route::default()
    }]
}

/// The routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Analyse with this model, on this frame (0-based).
    Analyse {
        /// Model name.
        model: String,
        /// 0-based frame index.
        frame: u32,
    },
    /// Store only; the reason is shown in the job status.
    Skip(String),
}

fn matches(list: &[String], value: Option<&str>) -> bool {
    list.is_empty()
        || list.iter().any(|want| match value {
            Some(v) => want.eq_ignore_ascii_case(v),
            None => want.is_empty(),
        })
}

/// Decides what to do with an instance.
pub fn route(routes: &[Route], ix: &InstanceIndex, has_pixels: bool) -> Decision {
    if !has_pixels || !is_image_storage(&ix.sop_class_uid) {
        return Decision::Skip(format!(
            "not an image (SOP Class {}): stored, not analysed",
            ix.sop_class_uid
        ));
    }
    for r in routes {
        if matches(&r.modality, ix.modality.as_deref())
            && matches(&r.body_part, ix.body_part.as_deref())
            && matches(&r.view_position, ix.view_position.as_deref())
            && matches(&r.sop_class, Some(&ix.sop_class_uid))
        {
            let frame = r.frame.unwrap_or(1).max(1) - 1;
            return Decision::Analyse {
                model: r.model.clone(),
                frame,
            };
        }
    }
    Decision::Skip(format!(
        "no routing rule matches Modality={} BodyPartExamined={} ViewPosition={}: stored, not analysed",
        ix.modality.as_deref().unwrap_or("-"),
        ix.body_part.as_deref().unwrap_or("-"),
        ix.view_position.as_deref().unwrap_or("-"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ix(modality: &str, body: Option<&str>, class: &str) -> InstanceIndex {
        InstanceIndex {
            modality: Some(modality.into()),
            body_part: body.map(Into::into),
            sop_class_uid: class.into(),
            ..InstanceIndex::default()
        }
    }

    #[test]
    fn first_matching_rule_wins_and_others_are_skipped_with_a_reason() {
        let mut routes = vec![Route {
            model: "knee".into(),
            modality: vec!["CR".into()],
            body_part: vec!["KNEE".into()],
            frame: Some(2),
            ..Route::default()
        }];
        routes.extend(default_routes("cxr"));
        let dx = "1.2.840.10008.5.1.4.1.1.1.1";
        assert_eq!(
            route(&routes, &ix("CR", Some("knee"), dx), true),
            Decision::Analyse {
                model: "knee".into(),
                frame: 1
            }
        );
        assert_eq!(
            route(&routes, &ix("DX", None, dx), true),
            Decision::Analyse {
                model: "cxr".into(),
                frame: 0
            }
        );
        let Decision::Skip(why) = route(&routes, &ix("MR", Some("HEAD"), dx), true) else {
            panic!("MR must not route")
        };
        assert!(why.contains("Modality=MR"), "{why}");
        let Decision::Skip(why) = route(
            &routes,
            &ix("SR", None, "1.2.840.10008.5.1.4.1.1.88.22"),
            false,
        ) else {
            panic!("SR must not route")
        };
        assert!(why.contains("not an image"), "{why}");
    }
}
