// Readiness check of the local Kafka broker, run by scripts/stack (compiled
// once into .stack/kafka/check, or launched as a single source file) as
//   java -cp '.stack/kafka/libs/*' KafkaCheck.java BOOTSTRAP [TIMEOUT_SECONDS [NODE_IDS]]
//
// NODE_IDS (comma separated) are the nodes just started: each must be registered
// and unfenced (listed by DescribeCluster) before the cluster counts as ready,
// since a node that opened its port may still be catching up with the metadata.
// An open TCP port is not enough: the application needs metadata, the group
// coordinator and the transaction coordinator. Asking for each of them also
// creates __consumer_offsets and __transaction_state now, rather than during
// the first test (whose timeouts may be shorter). After a restart the broker
// accepts connections while it is still loading the coordinators' partitions
// (clients then get COORDINATOR_LOAD_IN_PROGRESS and retry), so ListGroups
// and ListTransactions, which ask every coordinator partition, are retried
// until they answer without error. Exit status 0 = ready.
import java.time.Duration;
import java.util.Arrays;
import java.util.Properties;
import java.util.Set;
import java.util.stream.Collectors;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.ListGroupsOptions;
import org.apache.kafka.clients.admin.ListTransactionsOptions;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class KafkaCheck {
    public static void main(String[] args) {
        try {
            check(args);
        } catch (Exception e) {
            // One line is enough: scripts/stack prints the broker's log next.
            Throwable root = e;
            while (root.getCause() != null) root = root.getCause();
            System.err.println("kafka-check: FAILED: " + e + (root != e ? " (cause: " + root + ")" : ""));
            System.exit(1);
        }
    }

    static void check(String[] args) throws Exception {
        String bootstrap = args[0];
        long timeoutS = args.length > 1 ? Long.parseLong(args[1]) : 60;
        long timeoutMs = TimeUnit.SECONDS.toMillis(timeoutS);
        Set<Integer> expected = args.length > 2 && !args[2].isEmpty()
            ? Arrays.stream(args[2].split(",")).map(Integer::valueOf).collect(Collectors.toSet())
            : Set.of();

        long requestMs = Math.min(5000, timeoutMs);

        Properties a = new Properties();
        a.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        a.put(AdminClientConfig.CLIENT_ID_CONFIG, "orders-stack-check");
        // Bound every call, including close(): by default Admin.close() waits
        // for pending calls for up to default.api.timeout.ms (60 s).
        a.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, Long.toString(requestMs));
        a.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, Long.toString(timeoutMs));

        Admin admin = Admin.create(a);
        try {
            long deadline = System.currentTimeMillis() + timeoutMs;
            untilOk(deadline, "nodes " + expected + " registered", () -> {
                Set<Integer> live = admin.describeCluster().nodes().get(requestMs, TimeUnit.MILLISECONDS)
                    .stream().map(n -> n.id()).collect(Collectors.toSet());
                if (!live.containsAll(expected)) throw new Exception("registered so far: " + live);
                System.out.println("kafka-check: +" + since() + " ms: metadata ok (nodes " + live + ")");
                return null;
            });
            // FindCoordinator(GROUP) -> creates __consumer_offsets if missing (with
            // a replication factor above 1 only once enough nodes are registered).
            admin.listConsumerGroupOffsets("orders-stack-check")
                 .partitionsToOffsetAndMetadata().get(timeoutMs, TimeUnit.MILLISECONDS);
            System.out.println("kafka-check: +" + since() + " ms: group coordinator ok");
            untilOk(deadline, "group coordinator load", () ->
                admin.listGroups(new ListGroupsOptions().timeoutMs((int) requestMs)).all().get());
            untilOk(deadline, "transaction coordinator load", () ->
                admin.listTransactions(new ListTransactionsOptions().timeoutMs((int) requestMs)).all().get());
            System.out.println("kafka-check: +" + since() + " ms: coordinators loaded");
        } finally {
            admin.close(Duration.ofSeconds(2));
        }

        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.CLIENT_ID_CONFIG, "orders-stack-check");
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, Long.toString(requestMs));
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Long.toString(Math.max(timeoutMs, requestMs + 5)));
        // A new transactional id each time: a known id would just get its old
        // producer id back, while a new one makes the broker fetch a block of
        // producer ids from the controller, which after a restart answers
        // COORDINATOR_LOAD_IN_PROGRESS until done - better here than in a test.
        // (Ids of finished transactions expire after transactional.id.expiration.ms.)
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "orders-stack-check-" + System.currentTimeMillis());
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Long.toString(timeoutMs));
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p);
        try {
            // FindCoordinator(TRANSACTION) + InitProducerId -> creates __transaction_state.
            producer.initTransactions();
            producer.beginTransaction();
            producer.commitTransaction();
        } finally {
            producer.close(Duration.ofSeconds(2));
        }
        System.out.println("kafka-check: +" + since() + " ms: transaction coordinator ok");
    }

    static final long STARTED = System.currentTimeMillis();

    /** Milliseconds since this check started: which step a slow start spends its time in. */
    static long since() { return System.currentTimeMillis() - STARTED; }

    interface Call { Object run() throws Exception; }

    /** Retries call until it succeeds; rethrows its last failure after the deadline. */
    static void untilOk(long deadline, String what, Call call) throws Exception {
        while (true) {
            try {
                call.run();
                return;
            } catch (Exception e) {
                if (System.currentTimeMillis() >= deadline) throw new Exception(what + " not done in time", e);
                Thread.sleep(200);
            }
        }
    }
}
