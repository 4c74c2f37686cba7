// Probe used by scripts/brokers: a real produce + consume round trip against Kafka, with the
// Java client copied from Maven Central (compiled once into .brokers/).
//
//   KafkaProbe roundtrip <bootstrap> <topic>          produce a fresh record, consume it back by offset
//   KafkaProbe write     <bootstrap> <topic> <value>  produce <value> with acks=all
//   KafkaProbe find      <bootstrap> <topic> <value>  exit 0 when a record with <value> is in the topic
//
// Exit codes: 0 ok, 1 not found / failed, 2 usage.
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class KafkaProbe {
    static final long DEADLINE_MS = Long.getLong("probe.timeout.ms", 30_000L);

    public static void main(String[] args) {
        if (args.length < 3) {
            System.err.println("usage: KafkaProbe roundtrip|write|find <bootstrap> <topic> [value]");
            System.exit(2);
        }
        String cmd = args[0], bootstrap = args[1], topic = args[2];
        int rc;
        try {
            switch (cmd) {
                case "roundtrip" -> {
                    ensureTopic(bootstrap, topic);
                    String value = "probe-" + UUID.randomUUID();
                    RecordMetadata md = produce(bootstrap, topic, value);
                    rc = find(bootstrap, topic, value, md) ? 0 : 1;
                    System.out.println(rc == 0 ? "ok: produced and consumed " + value + " (" + md.topic() + "-" + md.partition() + "@" + md.offset() + ")"
                                               : "FAILED: produced " + value + " but could not consume it");
                }
                case "write" -> {
                    need(args, 4);
                    ensureTopic(bootstrap, topic);
                    RecordMetadata md = produce(bootstrap, topic, args[3]);
                    System.out.println("written: " + md.topic() + "-" + md.partition() + "@" + md.offset());
                    rc = 0;
                }
                case "find" -> {
                    need(args, 4);
                    rc = find(bootstrap, topic, args[3], null) ? 0 : 1;
                    System.out.println(rc == 0 ? "found: " + args[3] : "NOT FOUND: " + args[3]);
                }
                default -> {
                    System.err.println("unknown command " + cmd);
                    rc = 2;
                }
            }
        } catch (Exception e) {
            System.out.println("FAILED: " + e);
            rc = 1;
        }
        System.exit(rc);
    }

    static void need(String[] args, int n) {
        if (args.length < n) {
            System.err.println("missing argument");
            System.exit(2);
        }
    }

    static Properties base(String bootstrap) {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("client.id", "surety-probe");
        p.put("request.timeout.ms", "10000");
        p.put("default.api.timeout.ms", String.valueOf(DEADLINE_MS));
        return p;
    }

    static void ensureTopic(String bootstrap, String topic) throws Exception {
        try (Admin admin = Admin.create(base(bootstrap))) {
            try {
                admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1))).all().get();
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
        }
    }

    static RecordMetadata produce(String bootstrap, String topic, String value) throws Exception {
        Properties p = base(bootstrap);
        p.put("acks", "all");
        p.put("enable.idempotence", "true");
        p.put("max.block.ms", String.valueOf(DEADLINE_MS));
        p.put("delivery.timeout.ms", String.valueOf(DEADLINE_MS));
        p.put("key.serializer", StringSerializer.class.getName());
        p.put("value.serializer", StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
            return producer.send(new ProducerRecord<>(topic, value, value)).get();
        }
    }

    /** Reads the topic (from md's offset, or from the beginning) until value is seen or the end is reached. */
    static boolean find(String bootstrap, String topic, String value, RecordMetadata md) {
        Properties p = base(bootstrap);
        p.put("enable.auto.commit", "false");
        p.put("key.deserializer", StringDeserializer.class.getName());
        p.put("value.deserializer", StringDeserializer.class.getName());
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(p)) {
            List<TopicPartition> parts = new ArrayList<>();
            if (md != null) {
                parts.add(new TopicPartition(topic, md.partition()));
            } else {
                for (PartitionInfo pi : consumer.partitionsFor(topic)) parts.add(new TopicPartition(topic, pi.partition()));
            }
            consumer.assign(parts);
            if (md != null) consumer.seek(parts.get(0), md.offset());
            else consumer.seekToBeginning(parts);
            Map<TopicPartition, Long> end = consumer.endOffsets(parts);
            long deadline = System.currentTimeMillis() + DEADLINE_MS;
            while (System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                    if (value.equals(r.value())) return true;
                }
                if (md == null) {
                    boolean atEnd = true;
                    for (TopicPartition tp : parts) atEnd &= consumer.position(tp) >= end.get(tp);
                    if (atEnd) return false;
                }
            }
            return false;
        }
    }
}
