// Probe used by scripts/brokers: a real send + pull round trip against the RocketMQ name server
// and broker, with the Java client copied from Maven Central (compiled once into .brokers/).
//
//   RocketProbe roundtrip <namesrv> <topic>          send a fresh message, pull it back by offset
//   RocketProbe write     <namesrv> <topic> <body>   send <body> (SEND_OK required)
//   RocketProbe find      <namesrv> <topic> <body>   exit 0 when a message with <body> is stored
//
// Exit codes: 0 ok, 1 not found / failed, 2 usage.
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import org.apache.rocketmq.client.consumer.DefaultMQPullConsumer;
import org.apache.rocketmq.client.consumer.PullResult;
import org.apache.rocketmq.client.consumer.PullStatus;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.MixAll;
import org.apache.rocketmq.common.TopicConfig;
import org.apache.rocketmq.common.constant.PermName;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.apache.rocketmq.common.message.MessageQueue;
import org.apache.rocketmq.remoting.protocol.body.ClusterInfo;
import org.apache.rocketmq.remoting.protocol.route.BrokerData;
import org.apache.rocketmq.tools.admin.DefaultMQAdminExt;

public class RocketProbe {
    static final long DEADLINE_MS = Long.getLong("probe.timeout.ms", 30_000L);

    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: RocketProbe roundtrip|write|find <namesrv> <topic> [body]");
            System.exit(2);
        }
        String cmd = args[0], ns = args[1], topic = args[2];
        int rc;
        try {
            switch (cmd) {
                case "roundtrip" -> {
                    ensureTopic(ns, topic);
                    String body = "probe-" + UUID.randomUUID();
                    SendResult r = send(ns, topic, body);
                    rc = pullAt(ns, r.getMessageQueue(), r.getQueueOffset(), body) ? 0 : 1;
                    System.out.println(rc == 0 ? "ok: sent and pulled back " + body + " (" + r.getMessageQueue() + " offset " + r.getQueueOffset() + ")"
                                               : "FAILED: sent " + body + " but could not pull it back");
                }
                case "write" -> {
                    need(args, 4);
                    ensureTopic(ns, topic);
                    SendResult r = send(ns, topic, args[3]);
                    System.out.println("written: " + r.getMessageQueue() + " offset " + r.getQueueOffset() + " msgId " + r.getMsgId());
                    rc = 0;
                }
                case "find" -> {
                    need(args, 4);
                    rc = find(ns, topic, args[3]) ? 0 : 1;
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
        System.exit(rc); // client threads are not all daemons
    }

    static void need(String[] args, int n) {
        if (args.length < n) {
            System.err.println("missing argument");
            System.exit(2);
        }
    }

    /** Creates the topic (4 queues) on every master of the cluster and waits for its route. */
    static void ensureTopic(String ns, String topic) throws Exception {
        DefaultMQAdminExt admin = new DefaultMQAdminExt(5_000);
        admin.setNamesrvAddr(ns);
        admin.setInstanceName("surety-probe-admin-" + ProcessHandle.current().pid());
        admin.start();
        try {
            long deadline = System.currentTimeMillis() + DEADLINE_MS;
            List<String> masters = new ArrayList<>();
            while (true) {
                ClusterInfo ci = admin.examineBrokerClusterInfo();
                masters.clear();
                for (Map.Entry<String, BrokerData> e : ci.getBrokerAddrTable().entrySet()) {
                    String addr = e.getValue().getBrokerAddrs().get(MixAll.MASTER_ID);
                    if (addr != null) masters.add(addr);
                }
                if (!masters.isEmpty()) break;
                if (System.currentTimeMillis() > deadline) throw new IllegalStateException("no broker registered with name server " + ns);
                Thread.sleep(500);
            }
            for (String addr : masters) {
                admin.createAndUpdateTopicConfig(addr, new TopicConfig(topic, 4, 4, PermName.PERM_READ | PermName.PERM_WRITE));
            }
            while (true) {
                try {
                    if (!admin.examineTopicRouteInfo(topic).getQueueDatas().isEmpty()) return;
                } catch (Exception e) {
                    if (System.currentTimeMillis() > deadline) throw e;
                }
                if (System.currentTimeMillis() > deadline) throw new IllegalStateException("no route for topic " + topic);
                Thread.sleep(300);
            }
        } finally {
            admin.shutdown();
        }
    }

    static SendResult send(String ns, String topic, String body) throws Exception {
        DefaultMQProducer p = new DefaultMQProducer("surety_probe_producer");
        p.setNamesrvAddr(ns);
        p.setInstanceName("surety-probe-producer-" + ProcessHandle.current().pid());
        p.setSendMsgTimeout(10_000);
        p.setRetryTimesWhenSendFailed(3);
        p.start();
        try {
            Message m = new Message(topic, "probe", body, body.getBytes(StandardCharsets.UTF_8));
            SendResult r = p.send(m);
            if (r.getSendStatus() != SendStatus.SEND_OK) throw new IllegalStateException("send status " + r.getSendStatus());
            return r;
        } finally {
            p.shutdown();
        }
    }

    static DefaultMQPullConsumer consumer(String ns) throws Exception {
        DefaultMQPullConsumer c = new DefaultMQPullConsumer("surety_probe_consumer");
        c.setNamesrvAddr(ns);
        c.setInstanceName("surety-probe-consumer-" + ProcessHandle.current().pid());
        c.start();
        return c;
    }

    static boolean pullAt(String ns, MessageQueue mq, long offset, String body) throws Exception {
        DefaultMQPullConsumer c = consumer(ns);
        try {
            long deadline = System.currentTimeMillis() + DEADLINE_MS;
            while (System.currentTimeMillis() < deadline) {
                PullResult pr = c.pull(mq, "*", offset, 1, 5_000);
                if (pr.getPullStatus() == PullStatus.FOUND) {
                    for (MessageExt m : pr.getMsgFoundList()) {
                        if (body.equals(new String(m.getBody(), StandardCharsets.UTF_8))) return true;
                    }
                    return false;
                }
                Thread.sleep(200); // not yet dispatched to the consume queue
            }
            return false;
        } finally {
            c.shutdown();
        }
    }

    static boolean find(String ns, String topic, String body) throws Exception {
        DefaultMQPullConsumer c = consumer(ns);
        try {
            for (MessageQueue mq : c.fetchSubscribeMessageQueues(topic)) {
                long offset = c.minOffset(mq), max = c.maxOffset(mq);
                while (offset < max) {
                    PullResult pr = c.pull(mq, "*", offset, 32, 5_000);
                    if (pr.getPullStatus() != PullStatus.FOUND) break;
                    for (MessageExt m : pr.getMsgFoundList()) {
                        if (body.equals(new String(m.getBody(), StandardCharsets.UTF_8))) return true;
                    }
                    offset = pr.getNextBeginOffset();
                }
            }
            return false;
        } finally {
            c.shutdown();
        }
    }
}
