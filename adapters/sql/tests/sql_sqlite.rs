//! surety-sql on SQLite (a temporary file per test). One relay per database file.

mod common;

use common::scenarios as s;
use surety_sql::sqlx::Sqlite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_publishes_once_and_rollback_never() {
    s::commit_and_rollback::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_typed_errors() {
    s::bad_input::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_between_lease_and_mark_sent_loses_nothing() {
    s::relay_killed_between_lease_and_mark_sent::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_shut_down_hands_back_the_batch_leased_ahead() {
    s::relay_shut_down_hands_back_the_batch_leased_ahead::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_destination_goes_dead_and_redrive_publishes() {
    s::refused_destination_dead_and_redrive::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_applies_each_effect_once() {
    s::inbox_applies_each_effect_once::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_messages_and_check_back() {
    s::prepared_messages_and_check_back::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_check_back_is_unknown_within_its_timeout() {
    s::a_hung_check_back_is_unknown_within_its_timeout::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_read_only_is_a_typed_error_and_loses_nothing() {
    s::database_read_only::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_lost_between_confirm_and_mark_sent_publishes_again() {
    s::database_lost_between_confirm_and_mark_sent::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_handler_applies_once_and_retries_after_an_error() {
    common::inbox_handler::applies_once_and_retries_after_an_error::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_complete_compensate_once_and_redeliver_when_missing() {
    s::receipts::<Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_a_typed_error() {
    s::database_down::<Sqlite>().await;
}
