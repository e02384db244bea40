//! docker-compose.yml must not drift from the native path: the same Kafka version as
//! `scripts/kafka/version`, and a broker whose settings agree with what the services create.
//! Text checks on purpose (no YAML parser among the dependencies): each setting is one line.

use commerce::config::DEFAULT_TOPIC_PARTITIONS;

fn read(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key: value` lines (comments and quotes stripped), wherever they are.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    text.lines()
        .map(|line| line.split(" #").next().unwrap_or_default().trim())
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().trim_matches('"'))
        .collect()
}

#[test]
fn compose_runs_the_kafka_version_the_native_path_pins() {
    let compose = read("docker-compose.yml");
    let pinned = read("../../scripts/kafka/version");
    let kafka_images: Vec<&str> = values(&compose, "image")
        .into_iter()
        .filter(|image| image.starts_with("apache/kafka"))
        .collect();
    assert_eq!(
        kafka_images,
        [format!("apache/kafka:{}", pinned.trim())],
        "docker-compose.yml's Kafka image vs scripts/kafka/version"
    );
}

#[test]
fn compose_kafka_agrees_with_the_topic_the_services_create() {
    let compose = read("docker-compose.yml");
    for partitions in values(&compose, "KAFKA_NUM_PARTITIONS") {
        assert_eq!(
            partitions,
            DEFAULT_TOPIC_PARTITIONS.to_string(),
            "KAFKA_NUM_PARTITIONS vs the services' COMMERCE_TOPIC_PARTITIONS default"
        );
    }
    // The services create their topic explicitly; a broker auto-creating topics would turn
    // a typo into a new topic.
    assert_eq!(
        values(&compose, "KAFKA_AUTO_CREATE_TOPICS_ENABLE"),
        ["false"]
    );
}
