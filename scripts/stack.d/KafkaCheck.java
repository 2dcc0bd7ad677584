// Readiness check of the local Kafka broker, run by scripts/stack as
//   java -cp '.stack/kafka/libs/*' KafkaCheck.java BOOTSTRAP [TIMEOUT_SECONDS]
// (single-file source launch: nothing to compile or ship).
//
// An open TCP port is not enough: the application needs metadata, the group
// coordinator and the transaction coordinator. Asking for each of them also
// creates __consumer_offsets and __transaction_state now, rather than during
// the first test (whose timeouts may be shorter). Exit status 0 = ready.
import java.util.Properties;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class KafkaCheck {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long timeoutS = args.length > 1 ? Long.parseLong(args[1]) : 60;
        long timeoutMs = TimeUnit.SECONDS.toMillis(timeoutS);

        Properties common = new Properties();
        common.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        common.put(AdminClientConfig.CLIENT_ID_CONFIG, "orders-stack-check");

        try (Admin admin = Admin.create(common)) {
            int nodes = admin.describeCluster().nodes().get(timeoutMs, TimeUnit.MILLISECONDS).size();
            System.out.println("kafka-check: metadata ok (" + nodes + " node)");
            // FindCoordinator(GROUP) -> creates __consumer_offsets if missing.
            admin.listConsumerGroupOffsets("orders-stack-check")
                 .partitionsToOffsetAndMetadata().get(timeoutMs, TimeUnit.MILLISECONDS);
            System.out.println("kafka-check: group coordinator ok");
        }

        Properties p = new Properties();
        p.putAll(common);
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "orders-stack-check");
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Long.toString(timeoutMs));
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
            // FindCoordinator(TRANSACTION) + InitProducerId -> creates __transaction_state.
            producer.initTransactions();
            producer.beginTransaction();
            producer.commitTransaction();
        }
        System.out.println("kafka-check: transaction coordinator ok");
    }
}
