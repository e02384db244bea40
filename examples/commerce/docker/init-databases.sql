-- One database per service (the services also create their own database at start when missing).
CREATE DATABASE order_service;
CREATE DATABASE payment_service;
CREATE DATABASE shipping_service;
CREATE DATABASE notification_service;
